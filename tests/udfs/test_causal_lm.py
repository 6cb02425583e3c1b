"""The onnx_causal_lm scorer: real decoder models built with torch, exported to ONNX, checked against torch.

Two model styles: ``plain`` takes ``input_ids`` only (the proxy model's export), ``masked`` also takes
``attention_mask`` and ``position_ids`` and honours them (a Hugging Face export's inputs).
"""

from __future__ import annotations

import gzip
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quadmix_spark.curation.config import ScorerConfig
from quadmix_spark.search.proxy_model import ModelShape, ProxyLM, apply_rope
from quadmix_spark.curation.scorers import ScorerError, build_scorer, fingerprint
from quadmix_udfs.onnx_causal_lm import ASKLLM_PROMPT, CausalLMScorer
from tests.conftest import DATA

TOK = str(DATA / "models" / "tokenizers" / "gpt_neox_20b.json")
VOCAB = 50304  # >= the tokenizer's 50,280 ids


class MaskedLM(torch.nn.Module):
    """A :class:`ProxyLM` taking ``attention_mask`` (keys to ignore) and ``position_ids`` (rotary positions)."""

    def __init__(self, lm: ProxyLM):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, position_ids):
        lm = self.lm
        cos, sin = lm.rope_cos[position_ids][:, None], lm.rope_sin[position_ids][:, None]
        T = input_ids.shape[1]
        allowed = torch.ones(T, T, dtype=torch.bool).tril()[None] & attention_mask.bool()[:, None, :]
        bias = torch.zeros(allowed.shape).masked_fill(~allowed, -1e9)[:, None]
        x = lm.embed(input_ids)
        for block in lm.blocks:
            h = block.norm1(x)
            B, _, C = h.shape
            attn = block.attn
            q, k, v = attn.qkv(h).view(B, T, 3, attn.n_head, attn.head_dim).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, attn_mask=bias)
            x = x + attn.proj(y.transpose(1, 2).reshape(B, T, C))
            x = x + block.mlp(block.norm2(x))
        return lm.head(lm.norm(x))


def _export(module, inputs: tuple, names: list[str], path, extra_axes: dict | None = None) -> str:
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["logits"] = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, inputs, str(path), input_names=names, output_names=["logits"],
                          dynamic_axes={**axes, **(extra_axes or {})}, opset_version=17, dynamo=False)
    return str(path)


@pytest.fixture(scope="module")
def lm() -> ProxyLM:
    torch.manual_seed(3)
    model = ProxyLM(ModelShape(vocab_size=VOCAB, n_layer=2, n_head=2, d_model=32, ffn=64, seq_len=1024)).eval()
    # random weights give every token about the same probability: sharpen the output so scores differ
    with torch.no_grad():
        model.head.weight.mul_(40)
    return model


@pytest.fixture(scope="module")
def models(lm, tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("causal_lm")
    ids = torch.randint(0, 1000, (2, 8))
    ones = torch.ones_like(ids)
    pos = torch.arange(8).expand(2, 8)
    return {
        "plain": _export(lm, (ids,), ["input_ids"], d / "plain.onnx"),
        "masked": _export(MaskedLM(lm), (ids, ones, pos), ["input_ids", "attention_mask", "position_ids"], d / "masked.onnx"),
    }


@pytest.fixture(scope="module")
def pages() -> list[str]:
    with gzip.open(DATA / "web" / "weborganizer_dev.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(20), f)]
    return texts + ["", "a", "Ünïcödé — 日本語のテキスト。", "word " * 400, "Short line.\nAnother line."]


def torch_scores(lm: ProxyLM, scorer: CausalLMScorer, seqs: list[list[int]]) -> np.ndarray:
    """Each sequence alone, unpadded, through the torch model, in float64 from the logits on."""
    out = []
    with torch.no_grad():
        for seq in seqs:
            logp = torch.log_softmax(lm(torch.tensor([seq]))[0].double(), dim=-1)
            if scorer.head == "askllm":
                yes, no = scorer.answer_ids()
                out.append(float(logp[-1, yes] - logp[-1, no]))
            elif len(seq) < 2:
                out.append(np.nan)
            else:
                out.append(float(logp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])].mean()))
    return np.array(out)


def scorer(model: str, head: str, **kw) -> CausalLMScorer:
    settings = {"max_length": 48, "batch_size": 4, "device": "cpu"}
    if head == "perplexity":
        settings["prefix_token"] = "<|endoftext|>"
    return CausalLMScorer(model, TOK, head, **{**settings, **kw})


@pytest.mark.parametrize("style", ["plain", "masked"])
@pytest.mark.parametrize("head", ["perplexity", "askllm"])
def test_scores_equal_the_torch_model(lm, models, pages, style, head):
    s = scorer(models[style], head)
    s.validate()
    got, labels = s.score(pages)
    want = torch_scores(lm, s, s.sequences(pages))
    assert labels is None and got.dtype == np.float64
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.nanmax(np.abs(got - want)) < 1e-4
    assert np.nanstd(got) > 0.05  # the documents are told apart, not all alike
    if head == "perplexity":  # "" and "a" (after the prefix token): nothing / one token to score
        assert np.isnan(got[pages.index("")]) and not np.isnan(got[pages.index("a")])
        assert (got[~np.isnan(got)] < 0).all()  # a mean log-likelihood


@pytest.mark.parametrize("head", ["perplexity", "askllm"])
def test_a_document_has_the_same_bits_alone_or_in_any_batch(models, pages, head):
    base = scorer(models["plain"], head).score(pages)[0]
    for batch_size in (1, 3, 16):
        again = scorer(models["plain"], head, batch_size=batch_size).score(pages)[0]
        assert np.array_equal(again, base, equal_nan=True), batch_size
    order = np.random.default_rng(0).permutation(len(pages))
    shuffled = scorer(models["plain"], head).score([pages[i] for i in order])[0]
    assert np.array_equal(shuffled, base[order], equal_nan=True)
    for i in (0, 5, len(pages) - 1):
        alone = scorer(models["plain"], head).score([pages[i]])[0]
        assert np.array_equal(alone, base[i : i + 1], equal_nan=True)


def test_the_pad_token_does_not_change_a_score(models, pages, tmp_path):
    """Right padding: a causal model's tokens never see the pads, whatever id they carry."""
    cfg = json.loads(open(TOK, encoding="utf-8").read())
    cfg["padding"] = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None, "pad_id": 4321,
                      "pad_type_id": 0, "pad_token": "x"}
    other = tmp_path / "tokenizer.json"
    other.write_text(json.dumps(cfg))
    for style in ("plain", "masked"):
        for head in ("perplexity", "askllm"):
            a = scorer(models[style], head).score(pages)[0]
            b = CausalLMScorer(models[style], str(other), head, max_length=48, batch_size=4,
                               prefix_token="<|endoftext|>" if head == "perplexity" else None).score(pages)[0]
            assert np.array_equal(a, b, equal_nan=True), (style, head)


def test_truncation_keeps_the_first_tokens_and_the_whole_prompt(lm, models):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(TOK)
    long = "The history of the river valley is long and varied. " * 60
    ids = tok.encode(long, add_special_tokens=False).ids
    assert len(ids) > 200
    ppl = scorer(models["plain"], "perplexity", max_length=40)
    (seq,) = ppl.sequences([long])
    assert seq == [tok.token_to_id("<|endoftext|>")] + ids[:40]
    ask = scorer(models["plain"], "askllm", max_length=40)
    (seq,) = ask.sequences([long])
    before, after = ask.prompt_parts()
    assert seq == before + ids[:40] + after and len(after) > 10
    assert ask.max_width() == len(before) + 40 + len(after)
    # scored at that length: equal to the torch model on the cut sequence
    for s in (ppl, ask):
        got = s.score([long])[0]
        assert abs(got[0] - torch_scores(lm, s, s.sequences([long]))[0]) < 1e-4


def test_fp16_logits_are_scored_in_float32(lm, pages, tmp_path):
    class Half(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids).half()

    path = _export(Half(lm), (torch.randint(0, 1000, (2, 8)),), ["input_ids"], tmp_path / "half.onnx")
    import onnx

    assert onnx.load(path).graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    for head in ("perplexity", "askllm"):
        s = scorer(path, head)
        got = s.score(pages)[0]
        want = []
        with torch.no_grad():
            for seq in s.sequences(pages):
                logp = torch.log_softmax(lm(torch.tensor([seq]))[0].half().double(), dim=-1)
                if head == "askllm":
                    yes, no = s.answer_ids()
                    want.append(float(logp[-1, yes] - logp[-1, no]))
                else:
                    want.append(float(logp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])].mean()) if len(seq) > 1 else np.nan)
        assert np.nanmax(np.abs(got - np.array(want))) < 2e-3  # fp16 logits differ in their last bits across kernels


def test_weights_in_onnx_external_data_stay_in_their_folder(models, pages, tmp_path, monkeypatch):
    import onnx

    folder = tmp_path / "external"
    folder.mkdir()
    onnx.save(onnx.load(models["masked"]), str(folder / "model.onnx"), save_as_external_data=True,
              location="weights.bin", size_threshold=1024)
    assert (folder / "weights.bin").stat().st_size > 10 * (folder / "model.onnx").stat().st_size
    monkeypatch.chdir(tmp_path)  # the weights are found from the model's folder, not the working directory
    for head in ("perplexity", "askllm"):
        a = scorer(models["masked"], head).score(pages[:6])[0]
        b = scorer(str(folder / "model.onnx"), head).score(pages[:6])[0]
        assert np.array_equal(a, b, equal_nan=True)


def _config(model: str, **kw) -> ScorerConfig:
    return ScorerConfig(**{"type": "onnx_causal_lm", "model": model, "tokenizer": TOK, "head": "perplexity", **kw})


def test_unusable_models_and_settings_are_refused_with_the_reason(models, tmp_path):
    torch.manual_seed(0)
    small = ProxyLM(ModelShape(vocab_size=1000, n_layer=1, n_head=2, d_model=16, ffn=32, seq_len=256)).eval()
    small_path = _export(small, (torch.randint(0, 1000, (2, 8)),), ["input_ids"], tmp_path / "small.onnx")
    with pytest.raises(ScorerError, match="scorer 'ppl'.*(out of the model's range|logits)"):
        build_scorer("ppl", _config(small_path))

    class WithCache(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, past):
            return self.lm(input_ids) + past.sum()

    cached = _export(WithCache(small), (torch.randint(0, 1000, (2, 8)), torch.zeros(2, 3)), ["input_ids", "past_key_values.0.key"],
                     tmp_path / "cached.onnx", {"past_key_values.0.key": {0: "batch"}})
    with pytest.raises(ScorerError, match="KV cache.*text-generation-with-past"):
        build_scorer("ppl", _config(cached))
    with pytest.raises(ScorerError, match="answer 'yes please' is 2 tokens"):
        build_scorer("ask", _config(models["plain"], head="askllm", answer_tokens=["yes please", " no"]))
    with pytest.raises(ScorerError, match="prefix_token '<s>' is not a token"):
        build_scorer("ppl", _config(models["plain"], prefix_token="<s>"))
    with pytest.raises(ValueError, match="exactly one \\{text\\} slot"):
        _config(models["plain"], head="askllm", prompt="Is this good? ANSWER:")
    with pytest.raises(ValueError, match="`prompt` is not for head=perplexity"):
        _config(models["plain"], prompt="{text} ANSWER:")
    with pytest.raises(ValueError, match="gives a score"):
        _config(models["plain"], output="label")
    with pytest.raises(ValueError, match="head=perplexity is for onnx_causal_lm"):
        ScorerConfig(type="onnx_transformer", model=models["plain"], tokenizer=TOK, head="perplexity")
    with pytest.raises(ValueError, match="`prefix_token` is only for onnx_causal_lm"):
        ScorerConfig(type="fasttext", model=models["plain"], prefix_token="x")


def test_the_version_follows_the_prompt_the_answers_and_the_model(models, tmp_path):
    ask = _config(models["plain"], head="askllm")
    base = build_scorer("ask", ask).version
    assert build_scorer("ask", ask).version == base
    assert build_scorer("ask", ask.model_copy(update={"batch_size": 2, "device": "cpu"})).version == base
    assert build_scorer("ask", ask.model_copy(update={"prompt": ASKLLM_PROMPT})).version != base  # stated, not defaulted
    assert build_scorer("ask", ask.model_copy(update={"answer_tokens": [" Yes", " No"]})).version != base
    assert build_scorer("ask", ask.model_copy(update={"max_length": 64})).version != base
    other = tmp_path / "other.onnx"
    shutil.copyfile(models["masked"], other)
    assert build_scorer("ask", ask.model_copy(update={"model": str(other)})).version != base
    # scorers of other types keep their versions (the new optional settings are left out when unset)
    assert fingerprint(ScorerConfig(type="fasttext", model=str(DATA / "models" / "lid" / "lid.176.ftz"), label="en")) == "a8b00c6f"


def test_annotate_normalize_and_sample_with_both_heads(spark, models, tmp_path):
    from pyspark.sql import functions as F

    from quadmix_spark.curation.annotate import run_annotate
    from quadmix_spark.curation.ingest import run_ingest
    from quadmix_spark.kernel.theta import sample_thetas
    from quadmix_spark.curation.normalize import run_normalize
    from quadmix_spark.curation.sample import run_sample
    from quadmix_spark.core.storage import read_table
    from tests.conftest import make_config

    with gzip.open(DATA / "web" / "weborganizer_dev.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(60), f)]
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"id": f"d{i:03d}", "text": r["text"]}) + "\n")
    lid = str(DATA / "models" / "lid" / "lid.176.ftz")
    scorers = {"lang": {"type": "fasttext", "model": lid, "output": "label"},
               "ppl": {"type": "onnx_causal_lm", "model": models["plain"], "tokenizer": TOK, "head": "perplexity",
                       "prefix_token": "<|endoftext|>", "max_length": 48, "batch_size": 4},
               "ask": {"type": "onnx_causal_lm", "model": models["masked"], "tokenizer": TOK, "head": "askllm",
                       "max_length": 32, "batch_size": 4}}
    cfg = make_config(tmp_path / "store", f"ingest.input=[{tmp_path / 'docs.jsonl'}]", "sampling.coarse_bins=64",
                      f"scorers={json.dumps(scorers)}", "annotate.domain_scorer=lang", 'annotate.quality_scorers=["ppl", "ask"]',
                      "annotate.partitions=3")
    run_ingest(spark, cfg)
    report = run_annotate(spark, cfg)
    assert report.scored["ppl"] == report.scored["ask"] == len(rows)
    ann = {r.doc_id: r for r in read_table(spark, cfg.storage.table("annotations")).collect()}
    docs = {r.doc_id: r.text for r in read_table(spark, cfg.storage.table("documents")).collect()}
    ids = sorted(ann)
    for name in ("ppl", "ask"):
        adapter = build_scorer(name, cfg.scorers[name]).adapter
        want = adapter.score([docs[i] for i in ids])[0]
        assert [getattr(ann[i], f"q_{name}") for i in ids] == want.tolist()  # the same bits in Spark's batches
        assert ann[ids[0]].scorer_versions[f"q_{name}"].startswith(f"{name}@v1.")
    run_normalize(spark, cfg.storage.table("annotations"), cfg.storage.table("score_knots"), "percentile", 101)
    knots = read_table(spark, cfg.storage.table("score_knots")).select("criterion").distinct().collect()
    assert {r.criterion for r in knots} == {"ppl", "ask"}
    domains = sorted({r.domain for r in ann.values()})
    (theta,) = sample_thetas(domains, ["ppl", "ask"], 1, seed=5)
    run_sample(spark, cfg, theta=theta)
    sel = read_table(spark, cfg.storage.table("selection")).where(F.col("run") == "default").collect()
    assert sel and {r.doc_id for r in sel} <= set(ids) and sum(r.copies for r in sel) > 0


def test_the_trained_reference_lm_is_deterministic_and_a_distribution_over_every_token(tmp_path):
    """train-scorers' perplexity model: the same weights from the same text and seed; the exported graph's
    softmax over the tokenizer's vocabulary gives each rare token its class's probability over the class size."""
    from quadmix_spark.curation.causal_lm_train import LMSettings, export_onnx, train_causal_lm

    with gzip.open(DATA / "reference" / "alpaca_eval_outputs.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["output"] for _, line in zip(range(150), f)]
    settings = LMSettings(vocab=512, d_model=32, layers=1, seq_len=32, steps=12, batch_size=4)
    a, stats = train_causal_lm(texts, TOK, settings)
    b, _ = train_causal_lm(texts, TOK, settings)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert stats["lm_vocab"] == 512 and stats["train_tokens"] > 10_000
    ids = torch.tensor([[5, 100, 2000, 40000, 50000]])
    with torch.no_grad():
        full = torch.log_softmax(a(ids)[0].double(), dim=-1)[0]
        compact = torch.log_softmax(a.lm(a.table[ids]).double(), dim=-1)[0]
    assert full.shape[-1] == 50280 and torch.allclose(full.exp().sum(-1), torch.ones(5, dtype=torch.float64))
    members = torch.bincount(a.table, minlength=512).double()
    assert members[511] > 40_000  # the rare class
    want = compact[:, a.table] - members[a.table].log()
    assert torch.allclose(full, want, atol=1e-5)
    export_onnx(a, str(tmp_path / "lm.onnx"))
    s = CausalLMScorer(str(tmp_path / "lm.onnx"), TOK, "perplexity", max_length=31, batch_size=4, device="cpu",
                       prefix_token="<|endoftext|>")
    s.validate()
    got = s.score(texts[:8])[0]
    seqs = s.sequences(texts[:8])
    with torch.no_grad():
        ref = [float(torch.log_softmax(a(torch.tensor([q]))[0][0].double(), -1)[torch.arange(len(q) - 1), torch.tensor(q[1:])].mean())
               for q in seqs]
    # float32 log-softmax over the 512 classes in the graph, float64 over the 50,280 ids in the reference: ~1e-7
    # apart (~1e-4 with the float32 softmax over the 50,280 ids); a head off by a position, a token or a class
    # size is off by ~1e-3 or more
    assert np.max(np.abs(got - np.array(ref))) < 1e-5


def test_a_declared_class_vocabulary_is_scored_over_classes_and_checked_against_the_full_logits(tmp_path):
    """The reference LM's export declares its token-to-class table: the scorer's graph then never forms the
    50,280 logits (those nodes are dropped), gives the full-vocabulary head's scores to float32 rounding with
    both heads, and a declaration its full logits contradict is refused with the gap."""
    import onnx

    from quadmix_spark.curation.causal_lm_train import LMSettings, export_onnx, train_causal_lm
    from quadmix_udfs.onnx_causal_lm import CLASSES_KEY, scoring_graph
    from quadmix_udfs.fasttext_scorer import ModelLoadError

    with gzip.open(DATA / "reference" / "alpaca_eval_outputs.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["output"] for _, line in zip(range(120), f)]
    model, _ = train_causal_lm(texts, TOK, LMSettings(vocab=256, d_model=32, layers=1, seq_len=32, steps=8, batch_size=4))
    path = str(tmp_path / "lm.onnx")
    export_onnx(model, path)

    for head in ("perplexity", "askllm"):
        factored = scoring_graph(path, head)
        full = scoring_graph(path, head, classes=False)
        shapes = lambda g: {tuple(t.dims) for t in g.graph.initializer}  # noqa: E731
        assert (50280,) in shapes(factored) and (256, 32) in shapes(factored)  # the table and the output layer
        assert not any("logits" in n.output for n in factored.graph.node)  # the full logits are not computed
        assert any("logits" in n.output for n in full.graph.node)
        kw = {"prompt": "Q: {text}\nA:", "answer_tokens": (" yes", " no")} if head == "askllm" else {}
        fast = CausalLMScorer(path, TOK, head, max_length=24, batch_size=4, device="cpu", **kw)
        fast.validate()
        # naming the output reads it as it is: the full vocabulary
        slow = CausalLMScorer(path, TOK, head, max_length=24, batch_size=4, device="cpu", output_name="logits", **kw)
        assert fast.classes() is not None and slow.classes() is None
        assert fast.fingerprint_settings() != slow.fingerprint_settings()
        a, b = fast.score(texts[:12])[0], slow.score(texts[:12])[0]
        assert np.max(np.abs(a - b)) < 5e-4 and np.all(np.isfinite(a))  # float32 over 50,280 logits: ~1e-4 off
        assert len(set(a.tolist())) == 12  # real, varied scores

    def declaring(name: str, table=None, output: str = "class_logits") -> str:
        m = onnx.load(path)
        if table is not None:
            m.graph.initializer.append(onnx.numpy_helper.from_array(table, "other_table"))
        entry = next(p for p in m.metadata_props if p.key == CLASSES_KEY)
        entry.value = json.dumps({"class_logits": output, "token_class": "other_table" if table is not None else name})
        out = str(tmp_path / f"{name}-{output}.onnx")
        onnx.save(m, out)
        return out

    ids = onnx.numpy_helper.to_array(next(t for t in onnx.load(path).graph.initializer if t.name == "table")).copy()
    ids[[13, 15, 20, 286]] = ids[[50000, 50001, 50002, 50003]]  # frequent ids declared in the rare class
    wrong = CausalLMScorer(declaring("moved", ids), TOK, "perplexity", max_length=31, batch_size=4, device="cpu")
    with pytest.raises(ModelLoadError, match="declares a class-factored vocabulary.*differ by up to"):
        wrong.validate()
    with pytest.raises(ModelLoadError, match="names output 'hidden', which the graph lacks"):
        scoring_graph(declaring("table", output="hidden"), "perplexity")
    with pytest.raises(ModelLoadError, match="names 'nothing', which is not a 1-D"):
        scoring_graph(declaring("nothing"), "perplexity")
    short = CausalLMScorer(declaring("short", ids[:1000]), TOK, "perplexity", max_length=31, batch_size=4, device="cpu")
    with pytest.raises(ModelLoadError, match="maps 1000 token ids to classes"):
        short.validate()
