"""What asking the graph for the last position's logits saves at prefill, on a real vocabulary.

    python scripts/bench_prefill_logits.py --out docs/bench_prefill_logits [--vocab 151936] [--prompt-len 512]
                                           [--batch 1] [--rounds 3] [--threads 2]

Builds a seeded Mixtral-shaped int4 model (hidden 1024, 2 layers, 8 experts top-2) with the given vocabulary
(151936: Qwen-MoE's and Qwen3's), then generates 4 tokens from the same prompt with the runtime as it is (the
prefill feeds ``logits_position``: one LM head row per prompt) and with that input left at its default (every
position's logits, what a graph without it computes). Each measurement runs in its own process; memory is the
growth of the resident set during the generation (sampled every 2 ms), over the loaded model's. The two variants
alternate round by round. The generated tokens must be equal.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, os, sys, threading, time
import numpy as np
from moerun.runtime import MoEModel

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

model_dir, picks, prompt_len, batch, threads = sys.argv[1], sys.argv[2] == "1", *map(int, sys.argv[3:])
m = MoEModel.load(model_dir, provider="cpu", threads=threads)
m.runner.picks_position = picks and m.runner.picks_position
rng = np.random.default_rng(0)
prompts = rng.integers(3, m.manifest.vocab_size, size=(batch, prompt_len)).tolist()
m.generate_ids([[5, 6, 7]], max_new_tokens=2)  # warm-up: first-run allocations are not the prefill's
before, peak, done = rss_mb(), [0.0], threading.Event()

def watch():  # ru_maxrss cannot be reset after the load's own peak: sample the resident set instead
    while not done.is_set():
        peak[0] = max(peak[0], rss_mb())
        time.sleep(0.002)

watcher = threading.Thread(target=watch)
watcher.start()
out = m.generate_ids(prompts, max_new_tokens=4)
done.set()
watcher.join()
print(json.dumps({"ttft_s": m.last_stats.prefill_s, "rss_before_mb": before,
                  "generation_rss_mb": max(peak[0], rss_mb()) - before, "tokens": out}))
"""

VARIANTS = {"last position (logits_position fed)": "1", "every position (default)": "0"}


def build(directory: Path, vocab: int) -> Path:
    import torch
    import transformers

    from moerun.converter.convert import convert
    from moerun.converter.quantize import QuantizeOptions

    model_dir = directory / f"mixtral-v{vocab}-int4"
    if (model_dir / "moerun.json").is_file():
        return model_dir
    config = transformers.MixtralConfig(vocab_size=vocab, hidden_size=1024, intermediate_size=2816,
                                        num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4,
                                        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
                                        tie_word_embeddings=False)
    config.architectures = ["MixtralForCausalLM"]
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).eval().save_pretrained(directory / f"mixtral-v{vocab}-hf")
    convert(directory / f"mixtral-v{vocab}-hf", model_dir, quantize=QuantizeOptions(bits=4), overwrite=True)
    return model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "moerun-prefill-logits")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model_dir = build(args.workdir, args.vocab)
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, flag in VARIANTS.items():
            out = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), flag, str(args.prompt_len),
                                  str(args.batch), str(args.threads)], capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    tokens = {json.dumps(r["tokens"]) for rs in runs.values() for r in rs}
    assert len(tokens) == 1, "the two variants generated different tokens"
    load = os.getloadavg()
    lines = ["# Prefill logits: last position only vs every position\n",
             f"Mixtral-shaped int4 model (hidden 1024, 2 layers, 8 experts top-2), vocabulary {args.vocab}; prompt of "
             f"{args.prompt_len} tokens, batch {args.batch}, 4 new tokens, {args.threads} threads, CPU EP; medians of "
             f"{args.rounds} alternating rounds, each in its own process (min..max). Load average after: "
             f"{load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}. Generated tokens equal.\n",
             "| prefill logits | TTFT s | memory during generation MB |", "|---|---|---|"]
    record = []
    for name, rs in runs.items():
        ttft, rss = [r["ttft_s"] for r in rs], [r["generation_rss_mb"] for r in rs]
        lines.append(f"| {name} | {statistics.median(ttft):.3f} ({min(ttft):.3f}..{max(ttft):.3f}) | "
                     f"{statistics.median(rss):.0f} ({min(rss):.0f}..{max(rss):.0f}) |")
        record.append({"variant": name, "ttft_s": ttft, "generation_rss_mb": rss})
    first, second = (statistics.median(r["ttft_s"]) for r in record)
    lines.append(f"\nTTFT ratio (every / last): {second / first:.2f}x")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "runs": record}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
