"""Real-size conversion on this machine: synthesize a release-shaped checkpoint, convert it streamed, run it.

    python scripts/bench_convert.py --shape olmoe-7b --workdir /data/bench --out docs/bench_convert

1. Writes a seeded random bf16 checkpoint of the shape (``synthetic_checkpoint.py``; OLMoE-1B-7B:
   6.9B parameters, 13.8 GB, 16 shards, per-expert tensors as the release has them).
2. Converts it with ``moerun convert --quantize int4 --fp16`` (the serving default for big models) in
   its own process: wall time, peak RSS (VmHWM), GB of checkpoint per minute, output size.
3. Generates 64 tokens from the int4 model (``moerun.bench``'s worker): decode tokens/s at batch 1 and
   the % of the memory-bandwidth bound (weight bytes a decode step reads / measured copy bandwidth).

Writes OUT.md and OUT.json. Not part of the test suite: it takes tens of minutes and ~20 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from moerun.bench import decode_bytes_per_token, measured_bandwidth_gb_s
from moerun.converter.report import run_worker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_checkpoint import SHAPES, build_config, synthesize  # noqa: E402

_CONVERT = """
import json, sys, time
from moerun.converter.convert import convert
from moerun.converter.quantize import QuantizeOptions
from moerun.runtime.memory import peak_rss_mb
start = time.perf_counter()
result = convert(sys.argv[1], sys.argv[2], overwrite=True,
                 quantize=QuantizeOptions(fp16=sys.argv[3] == "fp16", dense=sys.argv[4]))
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(),
                  "stages": result.seconds, "onnx_bytes": result.onnx_bytes, "loads": result.group_loads}))
"""


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="olmoe-7b")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rest", choices=["fp16", "fp32"], default="fp16",
                        help="Precision of everything but the experts (fp16: the size-optimal default for big models).")
    parser.add_argument("--dense", choices=["none", "int8", "int4"], default="none",
                        help="Also quantize the dense MatMuls (attention, lm_head) to MatMulNBits.")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="Keep the checkpoint and the model in WORKDIR.")
    parser.add_argument("--measure-only", action="store_true",
                        help="Reuse the kept model and OUT.json's conversion record; measure generation again.")
    args = parser.parse_args()
    checkpoint = args.workdir / f"{args.shape}-bf16"
    output = args.workdir / f"{args.shape}-int4-{args.rest}{'' if args.dense == 'none' else '-dense-' + args.dense}"
    record: dict = {"shape": args.shape, "rest": args.rest, "dense": args.dense}

    if not (checkpoint / "model.safetensors.index.json").is_file():
        print(f"writing the synthetic checkpoint to {checkpoint}", flush=True)
        start = time.perf_counter()
        config = build_config(args.shape)
        synthesize(config, checkpoint)
        from moerun.bench import word_level_tokenizer

        word_level_tokenizer(config.vocab_size).save_pretrained(checkpoint)
        record["synthesize_s"] = time.perf_counter() - start
    checkpoint_bytes = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    record["checkpoint_bytes"] = checkpoint_bytes

    if args.measure_only:
        converted = json.loads(args.out.with_suffix(".json").read_text())["convert"]
    else:
        print(f"converting (int4 experts, {args.rest} elsewhere)", flush=True)
        converted = json.loads(run_worker([sys.executable, "-c", _CONVERT, checkpoint, output, args.rest, args.dense],
                                          "conversion").strip().splitlines()[-1])
    record.update(convert=converted, gb_per_min=checkpoint_bytes / 1e9 / (converted["seconds"] / 60))
    print(json.dumps(converted), flush=True)

    print(f"generating {args.new_tokens} tokens", flush=True)
    measured = json.loads(run_worker([sys.executable, "-m", "moerun.bench", "onnx", output, 1, 16, args.new_tokens,
                                      args.threads], "generation").strip().splitlines()[-1])
    measured.pop("tokens", None)
    bandwidth = measured_bandwidth_gb_s()
    # ONNX Runtime's CPU EP computes fp16 MatMuls in fp32 from fp32 copies of the weights made at load
    per_token = decode_bytes_per_token(output, fp16_read_as_fp32=True)
    bound = bandwidth * 1e9 / per_token
    record.update(generate=measured, bandwidth_gb_s=bandwidth, decode_bytes_per_token=per_token,
                  bandwidth_bound_tok_s=bound, bound_pct=100 * measured["decode_tok_s"] / bound)

    c = record["convert"]
    table = "\n".join([
        f"# Converting a {args.shape}-shaped checkpoint on this machine", "",
        "| | |", "|---|---|",
        f"| checkpoint (bf16 safetensors) | {_gb(checkpoint_bytes)} |",
        f"| output (int4 experts, {'dense ' + args.dense + ', ' if args.dense != 'none' else ''}{args.rest} rest) "
        f"| {_gb(c['onnx_bytes'])} "
        f"({c['onnx_bytes'] / checkpoint_bytes:.3f}x) |",
        f"| conversion wall time | {c['seconds'] / 60:.1f} min ({record['gb_per_min']:.2f} GB of checkpoint/min) |",
        f"| conversion peak RSS | {c['peak_rss_mb'] / 1024:.2f} GB |",
        f"| layer groups read | {c['loads']} |",
        f"| runtime peak RSS (load + generate) | {measured['peak_rss_mb'] / 1024:.2f} GB |",
        f"| decode, batch 1 | {measured['decode_tok_s']:.1f} tok/s ({record['bound_pct']:.0f}% of the "
        f"{bound:.1f} tok/s bandwidth bound: {per_token / 1e6:.0f} MB a token at {bandwidth:.1f} GB/s, fp16 "
        f"weights counted as the fp32 copies the CPU EP makes) |",
        f"| prefill, 16 tokens | {measured['prefill_tok_s']:.0f} tok/s |", "",
        "Stages (s): " + ", ".join(f"{k} {v:.0f}" for k, v in c["stages"].items()), "",
    ])
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(output, ignore_errors=True)


if __name__ == "__main__":
    main()
