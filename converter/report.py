"""The quantization report: every standard variant of one exported model, measured on held-out text.

Each variant is quantized from the same fp32 export and evaluated in its own process (so peak RSS
is its own): perplexity, next-token agreement with fp32, file size and ratio, peak RSS, decode speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..runtime import Manifest
from ..runtime.errors import MoerunError
from .quantize import QuantizeOptions, quantize_model

__all__ = ["STANDARD_VARIANTS", "build_report", "run_worker", "stdlib_corpus", "write_report"]

HELDOUT_CHARS = 60_000

# The grid the report always measures; the user's own choice is added when it is not one of these.
STANDARD_VARIANTS = [
    QuantizeOptions(bits=8, block_size=0, method="rtn", accuracy_level=0),
    QuantizeOptions(bits=8, block_size=64, method="rtn", accuracy_level=0),
    *[QuantizeOptions(bits=4, block_size=b, method=m, accuracy_level=0) for b in (0, 32, 64, 128)
      for m in ("rtn", "mse")],
    QuantizeOptions(bits=4, block_size=64, method="mse", scheme="asymmetric", accuracy_level=0),
    QuantizeOptions(bits=4, block_size=64, method="mse"),  # the default: accuracy_level 4
    QuantizeOptions(bits=4, block_size=64, method="mse", dense="int4"),
    QuantizeOptions(bits=4, block_size=64, method="mse", fp16=True),
    QuantizeOptions(bits=4, block_size=64, method="mse", dense="int4", fp16=True),
]


def stdlib_corpus() -> tuple[list[str], list[str]]:
    """(training, held-out) texts: the Python standard library's modules, every 10th one held out."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [(i, f.read_text(encoding="utf-8", errors="replace")) for i, f in enumerate(files)]
    return [t for i, t in texts if i % 10], [t for i, t in texts if i % 10 == 0]


def stdlib_heldout_text() -> str:
    return "\n".join(stdlib_corpus()[1])[:HELDOUT_CHARS]


def run_worker(cmd: list, what: str) -> str:
    """Run a worker process (measurements run in their own, so that peak RSS is theirs); its stdout, or a
    one-line MoerunError ending with the last line of its stderr."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise MoerunError(f"{what} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return proc.stdout


def _evaluate(model_dir: Path, text_file: Path, out: Path) -> tuple[dict, np.ndarray]:
    run_worker([sys.executable, "-m", "moerun.runtime.evaluate", model_dir, text_file, out],
               f"evaluating {model_dir.name}")
    return json.loads(out.read_text()), np.load(out.with_suffix(".argmax.npy"))


def _size(directory: Path) -> int:
    manifest = Manifest.load(directory)
    return sum(p.stat().st_size for p in directory.glob(f"{manifest.model_file}*"))


def build_report(source: Path, text: str, chosen: QuantizeOptions | None = None,
                 on_stage: Callable[[str], None] | None = None) -> list[dict]:
    """Rows for fp32 and every variant (plus ``chosen``); a variant the model cannot take says why."""
    variants = list(STANDARD_VARIANTS)
    if chosen is not None and chosen not in variants:
        variants.append(chosen)
    with tempfile.TemporaryDirectory(prefix="moerun-report-") as tmp:
        tmp = Path(tmp)
        text_file = tmp / "heldout.txt"
        text_file.write_text(text, encoding="utf-8")
        if on_stage:
            on_stage("evaluate fp32")
        base, base_argmax = _evaluate(source, text_file, tmp / "fp32.json")
        base_size = _size(source)
        rows = [{"variant": "fp32", **base, "agreement": 1.0, "bytes": base_size, "size_ratio": 1.0,
                 "ppl_change": 0.0, "chosen": False}]
        for options in variants:
            label = options.label
            if on_stage:
                on_stage(f"quantize + evaluate {label}")
            try:
                out = quantize_model(source, tmp / label, options).output
            except MoerunError as e:
                rows.append({"variant": label, "error": str(e), "chosen": options == chosen})
                continue
            result, argmax = _evaluate(out, text_file, tmp / f"{label}.json")
            size = _size(out)
            rows.append({
                "variant": label, **result, "agreement": float(np.mean(argmax == base_argmax)),
                "bytes": size, "size_ratio": size / base_size,
                "ppl_change": result["perplexity"] / base["perplexity"] - 1, "chosen": options == chosen,
                "options": {k: getattr(options, k) for k in options.__dataclass_fields__},
            })
    return rows


def write_report(rows: list[dict], path: Path, title: str) -> None:
    """Markdown table at ``path`` and the same rows as JSON beside it (``.json``)."""
    header = "| variant | perplexity | Δ vs fp32 | next-token agree | file | size vs fp32 | peak RSS | decode tok/s |"
    lines = [f"# {title}", "", header, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"**{r['variant']}** (written)" if r.get("chosen") else r["variant"]
        if "error" in r:
            lines.append(f"| {name} | n/a: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {name} | {r['perplexity']:.3f} | {r['ppl_change']:+.2%} | {r['agreement']:.2%} | "
                     f"{r['bytes'] / 2**20:.2f} MB | {r['size_ratio']:.3f}x | {r['peak_rss_mb']:.0f} MB | "
                     f"{r['decode_tokens_per_s']:.0f} |")
    lines += ["", f"{rows[0]['tokens']} scored tokens; windows of 256; agreement = argmax next token equal to "
              "fp32's; peak RSS of a process that loads the model and runs the evaluation (CPU EP)."]
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
