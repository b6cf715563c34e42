"""Where a moerun export spends its time: ONNX Runtime's own profiler (SessionOptions.enable_profiling) on the
bench's prompts, node times summed by op type, prefill and decode apart.

    python scripts/profile_ops.py MODEL_DIR [--batch 1] [--prompt-len 128] [--new-tokens 64] [--threads 2]

Prints one JSON object: per phase, total ms and ms per op type (largest first), plus the share of each run
spent outside nodes (ORT's and Python's per-step overhead: run time minus node time).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import onnxruntime as ort

from moerun.bench import _prompts
from moerun.runtime import MoEModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    prefix = Path(tempfile.mkdtemp(prefix="moerun-profile-")) / "ort"

    class ProfilingOptions(ort.SessionOptions):  # moerun's create_session builds its options from this class
        def __init__(self) -> None:
            super().__init__()
            self.enable_profiling = True
            self.profile_file_prefix = str(prefix)

    ort.SessionOptions = ProfilingOptions
    model = MoEModel.load(args.model_dir, provider="cpu", threads=args.threads)
    model.manifest.eos_token_id = []
    prompts = _prompts(model.manifest.vocab_size, args.batch, args.prompt_len)
    model.generate_ids(prompts, 2)  # warm-up: 2 runs
    model.generate_ids(prompts, args.new_tokens)
    events = json.loads(Path(model.runner.session.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[2:]  # after warm-up
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    out = {}
    for phase, phase_runs in (("prefill", runs[:1]), ("decode", runs[1:])):
        by_op, run_us = {}, sum(r["dur"] for r in phase_runs)
        for r in phase_runs:
            for n in nodes:
                if r["ts"] <= n["ts"] <= r["ts"] + r["dur"]:
                    op = n["args"].get("op_name", "?")
                    by_op[op] = by_op.get(op, 0) + n["dur"]
        node_us = sum(by_op.values())
        out[phase] = {"runs": len(phase_runs), "run_ms": run_us / 1000, "outside_nodes_ms": (run_us - node_us) / 1000,
                      "ms_by_op": {k: round(v / 1000, 2) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])}}
    out["wall"] = {"prefill_s": model.last_stats.prefill_s, "decode_s": model.last_stats.decode_s}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
