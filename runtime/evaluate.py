"""Measure a model directory on text: perplexity, next-token predictions, decode speed, peak memory.

Run as ``python -m moerun.runtime.evaluate MODEL_DIR TEXT_FILE OUT_JSON`` so that each variant's
peak RSS is its own process's; the quantization report does that for every variant.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .memory import peak_rss_mb
from .model import MoEModel
from .search import log_softmax

__all__ = ["EvalResult", "evaluate", "perplexity"]

WINDOW = 256
BATCH = 8


@dataclass
class EvalResult:
    perplexity: float
    tokens: int
    decode_tokens_per_s: float
    peak_rss_mb: float
    load_s: float


def perplexity(model: MoEModel, ids: list[int], window: int = WINDOW, batch: int = BATCH) -> tuple[float, np.ndarray]:
    """Perplexity over non-overlapping windows, and the argmax prediction at every scored position."""
    n = len(ids) // window
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {window}")
    windows = np.asarray(ids[: n * window], dtype=np.int64).reshape(n, window)
    nll, count, argmax = 0.0, 0, []
    for start in range(0, n, batch):
        chunk = windows[start:start + batch]
        logits, _ = model.forward(chunk)
        logp = log_softmax(logits[:, :-1].astype(np.float64))
        targets = chunk[:, 1:]
        nll -= np.take_along_axis(logp, targets[..., None], axis=-1).sum()
        count += targets.size
        argmax.append(logits[:, :-1].argmax(-1))
    return float(np.exp(nll / count)), np.concatenate(argmax).ravel()


def evaluate(model_dir: str | Path, text: str, new_tokens: int = 64) -> tuple[EvalResult, np.ndarray]:
    start = time.perf_counter()
    model = MoEModel.load(model_dir, provider="cpu")
    load_s = time.perf_counter() - start
    ids = model.tokenizer.encode(text)
    ppl, argmax = perplexity(model, ids)
    prompt = ids[:32]
    model.manifest.eos_token_id = []  # measure exactly new_tokens steps
    model.generate_ids([prompt], max_new_tokens=new_tokens)
    speed = model.last_stats.decode_tokens_per_s
    rss = peak_rss_mb()
    return EvalResult(ppl, int(argmax.size), speed, rss, load_s), argmax


def main(argv: list[str]) -> None:
    model_dir, text_file, out_json = argv
    result, argmax = evaluate(model_dir, Path(text_file).read_text(encoding="utf-8"))
    np.save(Path(out_json).with_suffix(".argmax.npy"), argmax)
    Path(out_json).write_text(json.dumps(asdict(result)))


if __name__ == "__main__":
    main(sys.argv[1:])
