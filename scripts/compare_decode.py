"""Decode steps of several decoder graphs (fused attention, genai's I/O contract) side by side in one process:
moerun's export against onnxruntime-genai's builder export, or two moerun exports, on a machine too busy for
wall-clock A/B runs.

    python scripts/compare_decode.py DIR[:CAP] DIR[:CAP] ... [--batch 1] [--prompt-len 512] [--steps 64]
                                      [--rounds 3] [--threads 1] [--profile]

Every graph runs through plain onnxruntime with IO binding and one KV buffer per tensor bound as past and
present (what DecoderRunner and genai's generator both do); ``:CAP`` gives the sliding-window layers
window-sized buffers of CAP positions (for graphs whose GroupQueryAttention has ``sliding_window_cache=1``, as
genai's builder writes for GPT-OSS). Steps are interleaved graph by graph, so a load spike hits every graph
alike, and each is timed in thread CPU time (at --threads 1 ONNX Runtime computes on the calling thread):
time stolen by other processes does not count. With --profile, ONNX Runtime's profiler adds per-op medians.
The greedy tokens of every graph are checked equal to the first's. Written by hand: no tool compares two ONNX
graphs step by step this way.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from moerun.bench import _prompts


class Graph:
    """One decoder graph with in-place KV buffers; ``step`` returns the CPU seconds of one ONNX Runtime run."""

    def __init__(self, spec: str, threads: int, profile: bool) -> None:
        directory, _, cap = spec.partition(":")
        self.name, self.cap = spec, int(cap) if cap else None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if profile:
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="moerun-compare-")) / "ort")
        self.session = ort.InferenceSession(str(Path(directory) / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.windowed = _windowed_layers(self.session) if self.cap else set()
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.vocab = self.session.get_outputs()[0].shape[-1]
        self.heads, self.head_size = self.past[0].shape[1], self.past[0].shape[3]
        if isinstance(self.head_size, str):  # genai's builder leaves it symbolic; its config has it
            config = json.loads((Path(directory) / "genai_config.json").read_text())["model"]["decoder"]
            self.heads, self.head_size = config["num_key_value_heads"], config["head_size"]

    def start(self, prompts: np.ndarray, steps: int) -> None:
        batch, length = prompts.shape
        self.binding = binding = self.session.io_binding()
        self.buffers = []
        for value in self.past:
            layer = int(value.name.split(".")[1])
            size = self.cap if layer in self.windowed else length + steps
            buffer = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, self.heads, size, self.head_size), np.float32))
            self.buffers.append(buffer)
            binding.bind_ortvalue_input(value.name, buffer)
            binding.bind_ortvalue_output(value.name.replace("past_key_values", "present"), buffer)
        logits = np.empty((batch, length, self.vocab), np.float32)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.mask = np.zeros((batch, length + steps), np.int64)
        self.mask[:, :length] = 1
        binding.bind_cpu_input("input_ids", prompts)
        binding.bind_cpu_input("attention_mask", self.mask[:, :length].copy())
        self.session.run_with_iobinding(binding)
        self.tokens = [logits[:, -1].argmax(-1)]
        self.logits = np.empty((batch, 1, self.vocab), np.float32)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self.logits))
        self.length = length

    def step(self) -> float:
        self.mask[:, self.length] = 1
        self.length += 1
        self.binding.bind_cpu_input("input_ids", self.tokens[-1][:, None].astype(np.int64))
        self.binding.bind_cpu_input("attention_mask", self.mask[:, : self.length].copy())
        start = time.thread_time()
        self.session.run_with_iobinding(self.binding)
        spent = time.thread_time() - start
        self.tokens.append(self.logits[:, -1].argmax(-1))
        return spent


def _windowed_layers(session: ort.InferenceSession) -> set[int]:
    """Layers whose past is window-sized: genai's builder names its dimension past_sliding_length; moerun's graphs
    keep one name, so for them the sliding layers are the even ones (GPT-OSS alternates, sliding first)."""
    named = {int(i.name.split(".")[1]) for i in session.get_inputs()
             if i.name.startswith("past_key_values.") and i.shape[2] == "past_sliding_length"}
    layers = {int(i.name.split(".")[1]) for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    return named or {layer for layer in layers if layer % 2 == 0}


def op_medians(path: str, steps: int) -> dict[str, float]:
    """Median ms per decode step of each op type in an ONNX Runtime profile (each round's prefill and first step
    left out)."""
    events = json.loads(Path(path).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    runs = [r for k, r in enumerate(runs) if k % steps > 1]
    starts = [r["ts"] for r in runs]
    per_op: dict[str, dict[int, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            i = bisect.bisect_right(starts, e["ts"]) - 1
            if i >= 0 and e["ts"] <= runs[i]["ts"] + runs[i]["dur"]:
                per_op[e["args"]["op_name"]][i] += e["dur"]
    return {op: statistics.median(d.values()) / 1000 for op, d in per_op.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graphs", nargs="+")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    graphs = [Graph(spec, args.threads, args.profile) for spec in args.graphs]
    prompts = np.asarray(_prompts(graphs[0].vocab, args.batch, args.prompt_len), dtype=np.int64)
    times: dict[str, list[float]] = {g.name: [] for g in graphs}
    for r in range(args.rounds + 1):  # round 0 warms up
        for g in graphs:
            g.start(prompts, args.steps)
        for i in range(args.steps - 1):
            for g in graphs if i % 2 == 0 else graphs[::-1]:
                spent = g.step()
                if r:
                    times[g.name].append(spent)
        for g in graphs[1:]:
            if not np.array_equal(np.stack(g.tokens, 1), np.stack(graphs[0].tokens, 1)):
                print(f"greedy tokens of {g.name} differ from {graphs[0].name}'s")
    first = statistics.median(times[graphs[0].name])
    print(f"batch {args.batch}, prompt {args.prompt_len}, {args.steps} steps x {args.rounds} rounds, "
          f"{args.threads} thread(s); load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print("| graph | CPU ms per decode step (median) | p10 | first graph / this |\n|---|---|---|---|")
    for name, spent in times.items():
        median = statistics.median(spent)
        print(f"| {name} | {1000 * median:.2f} | {1000 * float(np.percentile(spent, 10)):.2f} | {first / median:.3f} |")
    if args.profile:
        medians = {g.name: op_medians(g.session.end_profiling(), args.steps) for g in graphs}
        ops = sorted({op for m in medians.values() for op in m}, key=lambda op: -max(m.get(op, 0) for m in
                                                                                       medians.values()))
        print("\nper op type, median wall ms per decode step (ONNX Runtime's profiler):\n")
        print("| op | " + " | ".join(medians) + " |\n|---|" + "---|" * len(medians))
        for op in ops[:8]:
            print(f"| {op} | " + " | ".join(f"{m.get(op, 0):.3f}" for m in medians.values()) + " |")


if __name__ == "__main__":
    main()
