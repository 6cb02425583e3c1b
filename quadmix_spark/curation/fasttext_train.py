"""Train one fastText supervised model in a fresh Python process.

fastText (fasttext-numpy2 0.10) keeps state between trainings in one process: a second
``train_supervised`` gives a different model for the same input and seed, or fails with "Encountered
NaN". A fresh process per model makes training deterministic (one thread, fixed seed: same input, same
bytes) and isolates a crash of the native library from the job.

Usage: ``python -m quadmix_spark.curation.fasttext_train '<json of {"input", "output", "quantize", "params"}>'``.
"""

from __future__ import annotations

import json
import subprocess
import sys


class FastTextTrainError(RuntimeError):
    pass


def train_in_subprocess(input_path: str, output_path: str, params: dict, quantize: bool = False) -> None:
    """Train on ``input_path`` (``__label__x text`` lines) and save to ``output_path`` (.bin or .ftz)."""
    job = json.dumps({"input": input_path, "output": output_path, "quantize": quantize, "params": params})
    proc = subprocess.run([sys.executable, "-m", "quadmix_spark.curation.fasttext_train", job], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FastTextTrainError(f"fastText training of {output_path} failed: {' | '.join(tail)}")


def _main(job_json: str) -> None:
    import fasttext

    job = json.loads(job_json)
    model = fasttext.train_supervised(input=job["input"], thread=1, verbose=0, **job["params"])
    if job["quantize"]:
        model.quantize(input=job["input"], qnorm=True, retrain=False)
    model.save_model(job["output"])


if __name__ == "__main__":
    _main(sys.argv[1])
