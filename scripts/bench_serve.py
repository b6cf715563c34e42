"""`moerun serve` under load: continuous batching against one request at a time, side by side in one run.

    python scripts/bench_serve.py --out docs/bench_serve --workdir ~/.cache/moerun/bench-serve

Builds the Mixtral bench shape (scripts/bench_models.py: hidden 1024, 8 experts top-2, 4 layers, vocab 8000)
with seeded weights, converts it with int4 experts (the quantization defaults), and starts two `moerun serve`
processes on loopback: --max-batch 32 (continuous batching) and --max-batch 1 (one request at a time). For each
number of concurrent clients (1, 4, 16, 32), the clients stream completions (token-id prompts, greedy) from one
server, then the other, never both at once: total output tokens/s, p50/p99 request latency and p50/p99 time to
first token. Writes OUT.md, OUT.json and OUT.png (matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLIENTS = (1, 4, 16, 32)
MODES = {"continuous": 32, "one at a time": 1}  # mode -> --max-batch
REQUESTS = 16  # per row at least (2 x clients above 8 clients): 8 could not resolve 5% at 1 client


def prepare(workdir: Path) -> Path:
    """The int4 Mixtral-shaped model directory, built and converted once per workdir."""
    model = workdir / "mixtral-int4"
    if (model / "moerun.json").is_file():
        return model
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_models import build

    from moerun.converter.convert import convert
    from moerun.converter.quantize import QuantizeOptions

    checkpoint = build("mixtral", workdir / "mixtral-hf")
    start = time.perf_counter()
    convert(checkpoint, model, quantize=QuantizeOptions(bits=4), overwrite=True)
    print(f"converted to int4 in {time.perf_counter() - start:.0f} s", flush=True)
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(model: Path, max_batch: int, threads: int):
    import httpx

    port = free_port()
    exe = Path(sys.executable).with_name("moerun")
    proc = subprocess.Popen([str(exe), "serve", str(model), "--port", str(port), "--max-batch", str(max_batch),
                             "--max-queue", "256", "--threads", str(threads), "--provider", "cpu",
                             "--max-len", "1024"], stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"moerun serve --max-batch {max_batch} did not start")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


async def one_request(client, base: str, name: str, prompt: list[int], new_tokens: int) -> dict:
    body = {"model": name, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft": first, "latency": time.perf_counter() - start, "tokens": tokens}


async def load(base: str, name: str, clients: int, requests: int, prompts: list[list[int]], new_tokens: int) -> dict:
    """``clients`` concurrent clients, each sending its next request when the last one finished."""
    import httpx

    todo = list(range(requests))
    results = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker():
            while todo:
                i = todo.pop()
                results.append(await one_request(client, base, name, prompts[i % len(prompts)], new_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    lat = np.array([r["latency"] for r in results])
    ttft = np.array([r["ttft"] for r in results if r["ttft"] is not None])
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": requests, "output_tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "latency_p50_s": float(np.percentile(lat, 50)),
            "latency_p99_s": float(np.percentile(lat, 99)), "ttft_p50_s": float(np.percentile(ttft, 50)),
            "ttft_p99_s": float(np.percentile(ttft, 99))}


def batch_counters(base: str) -> dict[str, float]:
    """The server's own histogram sums and counts (/metrics): decode steps and prefill runs, with the requests in
    them."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"moerun_batch_size_sum", "moerun_batch_size_count", "moerun_prefill_batch_size_sum",
              "moerun_prefill_batch_size_count"}
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name in wanted}


def batching(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean requests per decode step and per prefill run over one load (the counters' differences)."""
    def mean(name: str) -> float:
        count = after[f"{name}_count"] - before[f"{name}_count"]
        return (after[f"{name}_sum"] - before[f"{name}_sum"]) / count if count else 0.0

    return {"mean_decode_batch": mean("moerun_batch_size"), "mean_prefill_batch": mean("moerun_prefill_batch_size"),
            "prefill_runs": int(after["moerun_prefill_batch_size_count"] - before["moerun_prefill_batch_size_count"])}


def markdown(records: list[dict]) -> str:
    lines = ["| clients | mode | output tok/s | vs one at a time | p50 latency s | p99 latency s | p50 TTFT s | "
             "p99 TTFT s | requests | prefill runs | mean decode batch |", "|---" * 11 + "|"]
    base = {r["clients"]: r["tokens_per_s"] for r in records if r["mode"] == "one at a time"}
    for r in records:
        lines.append(f"| {r['clients']} | {r['mode']} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s'] / base[r['clients']]:.2f}x | {r['latency_p50_s']:.2f} | "
                     f"{r['latency_p99_s']:.2f} | {r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} | {r['requests']} | "
                     f"{r.get('prefill_runs', '')} | {r.get('mean_decode_batch', 0):.1f} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (f"matplotlib is not installed here: plot with `python scripts/bench_serve.py --plot "
                f"{path.with_suffix('.json')}` where it is")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, color in zip(MODES, ("C0", "C1")):
        rows = [r for r in records if r["mode"] == mode]
        x = [r["clients"] for r in rows]
        left.plot(x, [r["tokens_per_s"] for r in rows], marker="o", color=color, label=mode)
        right.plot(x, [r["latency_p99_s"] for r in rows], marker="o", color=color, label=f"{mode}: p99 latency")
        right.plot(x, [r["ttft_p99_s"] for r in rows], marker="x", linestyle="--", color=color,
                   label=f"{mode}: p99 TTFT")
    for ax, ylabel in ((left, "output tokens/s"), (right, "seconds")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(CLIENTS, [str(c) for c in CLIENTS])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("moerun serve, Mixtral bench shape int4, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"plot: {path.name}"


def _loads(values) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "moerun" / "bench-serve")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", default=",".join(map(str, CLIENTS)))
    parser.add_argument("--plot", type=Path, default=None, help="Only plot this JSON (OUT.json) to OUT.png.")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` stops the servers too (the finally blocks)
    if args.plot:
        print(plot(json.loads(args.plot.read_text())["records"], args.plot.with_suffix(".png")))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = prepare(args.workdir)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    load_before = os.getloadavg()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 8000, args.prompt_len).tolist() for _ in range(64)]
    clients = [int(c) for c in args.clients.split(",")]
    records = []
    for i, n in enumerate(clients):
        # The server started first measured slower whatever its settings (0.3-0.65 ms per decode step, also with two
        # sessions in one process; cause not found): each row starts a fresh pair, the first one alternating.
        modes = list(MODES)[:: 1 if i % 2 == 0 else -1]
        with contextlib.ExitStack() as stack:
            bases = {mode: stack.enter_context(server(model, MODES[mode], args.threads)) for mode in modes}
            for base in bases.values():  # a first run of each session, not measured (ONNX Runtime warms up)
                asyncio.run(load(base, model.name, 2, 2, prompts, 8))
            for mode, base in bases.items():  # side by side: the same load on each, one after the other
                requests = max(REQUESTS, 2 * n)
                before = batch_counters(base)
                record = {"mode": mode, **asyncio.run(load(base, model.name, n, requests, prompts, args.new_tokens))}
                record.update(batching(before, batch_counters(base)))
                print(json.dumps(record), flush=True)
                records.append(record)
    meta = {"model": "Mixtral bench shape (hidden 1024, 8 experts top-2, 4 layers, vocab 8000), int4 experts",
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "threads": args.threads,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_average_before": load_before, "load_average_after": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    records.sort(key=lambda r: (r["clients"], r["mode"] != "continuous"))
    table = markdown(records)
    note = plot(records, args.out.with_suffix(".png"))
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(
        f"# moerun serve: continuous batching vs one request at a time\n\n{meta['model']}; prompts of "
        f"{args.prompt_len} token ids, {args.new_tokens} new tokens (greedy), streamed; each client sends its next "
        f"request when its last one ends (max({REQUESTS}, 2 x clients) requests per row). Both servers run with "
        f"--threads {args.threads} on {meta['cores']} cores, measured one after the other; each row starts a fresh "
        f"pair of servers, the first started alternating (the first one measured slower, whatever its settings); "
        f"the load generator shares the cores. Load average (1, 5, 15 min) before the run "
        f"{_loads(meta['load_average_before'])}, after "
        f"{_loads(meta['load_average_after'])} (above {meta['cores']}: other work shared the cores). {note}.\n\n"
        f"{table}")
    print(table)


if __name__ == "__main__":
    main()
