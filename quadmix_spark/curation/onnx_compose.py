"""Fold an embedding head into its encoder: one ONNX graph ``(input_ids, attention_mask, ...) -> logits``.

The ``onnx_transformer`` adapter can compose an encoder with a head file at run time (``head: embedding``);
this writes the same computation as a single classifier graph (attention-masked mean pooling, optional L2
normalisation, ``x @ weight + bias``), the shape of an exported Hugging Face sequence classifier. Serve it
with ``head: softmax`` (and the head's labels) or, for a one-output linear head, ``head: regression``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quadmix_udfs.onnx_transformer import load_head


def compose_classifier(
    encoder_path: str, head_path: str, out_path: str, output_name: str = "logits", probabilities: bool = False
) -> list[str]:
    """Write ``encoder + pooling + head`` to ``out_path``; returns the head's labels (empty for a linear head).

    With ``probabilities`` the graph ends in a softmax (serve it with ``outputs_are_probabilities: true``).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    head = load_head(head_path)
    model = onnx.load(encoder_path)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    if opset < 13:
        raise ValueError(f"{encoder_path}: opset {opset} < 13 is not supported")
    hidden = graph.output[0].name
    const = {
        "qm_axis1": np.array([1], dtype=np.int64),
        "qm_axis2": np.array([2], dtype=np.int64),
        "qm_eps": np.array(1e-9, dtype=np.float32),
        "qm_weight": head.weight.astype(np.float32),
        "qm_bias": head.bias.astype(np.float32),
    }
    graph.initializer.extend(numpy_helper.from_array(v, name=k) for k, v in const.items())
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["qm_mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["qm_mask_f", "qm_axis2"], ["qm_mask3"]),
        helper.make_node("Mul", [hidden, "qm_mask3"], ["qm_masked"]),
        helper.make_node("ReduceSum", ["qm_masked", "qm_axis1"], ["qm_sum"], keepdims=0),
        helper.make_node("ReduceSum", ["qm_mask3", "qm_axis1"], ["qm_count"], keepdims=0),
        helper.make_node("Max", ["qm_count", "qm_eps"], ["qm_count_c"]),
        helper.make_node("Div", ["qm_sum", "qm_count_c"], ["qm_mean"]),
    ]
    pooled = "qm_mean"
    if head.normalize:
        nodes += [
            helper.make_node("Mul", ["qm_mean", "qm_mean"], ["qm_sq"]),
            helper.make_node("ReduceSum", ["qm_sq", "qm_axis1"], ["qm_sqsum"], keepdims=1),
            helper.make_node("Sqrt", ["qm_sqsum"], ["qm_norm"]),
            helper.make_node("Max", ["qm_norm", "qm_eps"], ["qm_norm_c"]),
            helper.make_node("Div", ["qm_mean", "qm_norm_c"], ["qm_unit"]),
        ]
        pooled = "qm_unit"
    nodes += [
        helper.make_node("MatMul", [pooled, "qm_weight"], ["qm_proj"]),
        helper.make_node("Add", ["qm_proj", "qm_bias"], ["qm_logits" if probabilities else output_name]),
    ]
    if probabilities:
        nodes.append(helper.make_node("Softmax", ["qm_logits"], [output_name], axis=-1))
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", head.weight.shape[1]]))
    onnx.checker.check_model(model)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, out_path)
    return list(head.labels) if head.kind == "logistic" else []
