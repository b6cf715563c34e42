"""Where a translation's time goes, per ONNX operator: ONNX Runtime's session profiling on moerun models.

    python scripts/profile_translation.py MODEL_DIR [MODEL_DIR ...] --sources ids.json --batch 1 --beams 2

Each model's encoder and decoder sessions are reopened with ``enable_profiling`` (same threads, same graph),
the sources are translated once to warm up and once profiled, and ONNX Runtime's trace is summed per operator
type (kernel time of its "Node" events). Prints one table per model and writes --json if asked.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import onnxruntime as ort


def profiled(session: ort.InferenceSession, path: Path, threads: int, prefix: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = prefix
    options.log_severity_level = 4
    return ort.InferenceSession(str(path), options, providers=session.get_providers())


def op_times(trace: Path) -> dict[str, dict]:
    """Kernel microseconds and calls per op type from an ONNX Runtime profile (Chrome trace JSON)."""
    out: dict[str, dict] = defaultdict(lambda: {"us": 0, "calls": 0})
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "?")
            out[op]["us"] += event["dur"]
            out[op]["calls"] += 1
    return dict(out)


def profile(model_dir: Path, sources: list[list[int]], batch: int, beams: int, max_new: int, threads: int,
            workdir: Path) -> dict:
    from moerun import MoEModel

    model = MoEModel.load(model_dir, provider="cpu", threads=threads)
    runner = model.runner
    runner.encoder = profiled(runner.encoder, model_dir / "encoder.onnx", threads, str(workdir / "encoder"))
    runner.decoder = profiled(runner.decoder, model_dir / "decoder.onnx", threads, str(workdir / "decoder"))
    groups = [sources[i: i + batch] for i in range(0, len(sources), batch)]
    for group in groups[:1]:  # warm-up; the trace holds it too (one batch more than the timed run)
        model.translate_ids(group, num_beams=beams, max_new_tokens=max_new)
    start = time.perf_counter()
    rows = 0
    for group in groups:
        model.translate_ids(group, num_beams=beams, max_new_tokens=max_new)
        rows += model.last_stats.extra["decoder_rows"]
    seconds = time.perf_counter() - start
    result = {"model": str(model_dir), "label": (model.manifest.quantization or {}).get("label", "fp32"),
              "seconds": seconds, "decoder_rows": rows, "input_tok_s": sum(map(len, sources)) / seconds}
    for name, session in (("encoder", runner.encoder), ("decoder", runner.decoder)):
        result[name] = op_times(Path(session.end_profiling()))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--sources", type=Path, required=True, help="JSON list of token-id lists (eos last).")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--beams", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sources = json.loads(args.sources.read_text())
    results = []
    for model_dir in args.models:
        r = profile(model_dir, sources, args.batch, args.beams, args.max_new_tokens, args.threads, args.workdir)
        results.append(r)
        print(f"\n{r['label']}: {r['input_tok_s']:.0f} input tok/s, {r['seconds']:.2f} s, {r['decoder_rows']} rows "
              f"(the trace includes one warm-up batch)", file=sys.stderr)
        print("| graph | op | calls | ms | share |\n|---|---|---|---|---|")
        for graph in ("encoder", "decoder"):
            total = sum(v["us"] for v in r[graph].values()) or 1
            for op, v in sorted(r[graph].items(), key=lambda kv: -kv[1]["us"])[:8]:
                print(f"| {graph} | {op} | {v['calls']} | {v['us'] / 1000:.1f} | {v['us'] / total:.0%} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
