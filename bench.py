"""`moerun bench`: Hugging Face eager, the generic ONNX export, onnxruntime-genai, llama.cpp, and moerun's
fp32/int8/int4 exports of one checkpoint, side by side.

Each measurement runs in its own process (so peak RSS is that variant's own), variants are
interleaved and repeated, and medians are reported with min..max: these machines are noisy.
Written by hand: no library measures an MoE export against its PyTorch original this way.
"""

from __future__ import annotations

import inspect
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["BASELINES", "EXPORTS", "VARIANTS", "Record", "run_bench", "word_level_tokenizer"]

BASELINES = ("hf", "generic", "genai", "llamacpp")  # llamacpp: one GGUF per export (llamacpp.PAIRS)
# int8-dense / int4-dense: experts and the dense MatMuls (attention, lm_head) quantized, as llama.cpp's Q8_0 / Q4_0
# quantize every weight: the like-for-like pair for it.
EXPORTS = ("fp32", "int8", "int4", "int8-dense", "int4-dense")
VARIANTS = BASELINES + EXPORTS
FIELDS = ("prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb")


@dataclass
class Record:
    variant: str
    batch: int
    prompt_len: int
    new_tokens: int
    prefill_tok_s: float
    decode_tok_s: float
    ttft_ms: float
    peak_rss_mb: float
    file_mb: float
    bytes_per_token: float  # weight bytes one decode step must read (batch 1)
    bandwidth_bound_tok_s: float
    bound_pct: float | None  # batch 1 only: % of the bandwidth bound reached
    runs: int
    spread: dict
    hf_agreement: float | None = None  # share of greedy tokens equal to Hugging Face's (same prompts)


def word_level_tokenizer(vocab_size: int):
    """A tokenizer with one word per id (t0, t1, ...) for seeded benchmark checkpoints: the benchmarks
    feed token ids, but onnxruntime-genai's builder wants a tokenizer beside the weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", pad_token="t0", bos_token="t1",
                                   eos_token="t2")


def _prompts(vocab: int, batch: int, length: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return rng.integers(3, vocab, (batch, length)).tolist()


def _worker_onnx(model_dir: str, batch: int, length: int, new_tokens: int, threads: int | None) -> dict:
    from .runtime import MoEModel

    model = MoEModel.load(model_dir, provider="cpu", threads=threads)
    model.manifest.eos_token_id = []  # exactly new_tokens steps
    prompts = _prompts(model.manifest.vocab_size, batch, length)
    model.generate_ids(prompts, 2)  # warm-up
    tokens = model.generate_ids(prompts, new_tokens)
    s = model.last_stats
    return {"prefill_tok_s": s.prefill_tokens_per_s, "decode_tok_s": s.decode_tokens_per_s,
            "ttft_ms": s.prefill_s * 1000, "tokens": tokens}


def _worker_hf(checkpoint: str, batch: int, length: int, new_tokens: int, threads: int | None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ids = torch.tensor(_prompts(model.config.vocab_size, batch, length))
    # the last position's logits only, as transformers' generate asks at prefill (and moerun's runtime does)
    last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def run(steps: int) -> tuple[float, float, list]:
        with torch.no_grad():
            start = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, **last)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            prefill = time.perf_counter() - start
            cache, start, tokens = out.cache, time.perf_counter(), [token]
            for _ in range(steps - 1):
                out = model(input_ids=token, cache=cache, use_cache=True)
                cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(token)
            return prefill, time.perf_counter() - start, torch.cat(tokens, dim=1).tolist()

    run(2)  # warm-up
    prefill, decode, tokens = run(new_tokens)
    return {"prefill_tok_s": batch * length / prefill, "decode_tok_s": batch * (new_tokens - 1) / decode,
            "ttft_ms": prefill * 1000, "tokens": tokens}


def worker(argv: list[str]) -> None:
    """python -m moerun.bench KIND PATH BATCH PROMPT_LEN NEW_TOKENS THREADS: one measurement, JSON on stdout."""
    kind, path, batch, length, new_tokens, threads = argv
    fn = _worker_hf if kind == "hf" else _worker_onnx
    result = fn(path, int(batch), int(length), int(new_tokens), int(threads) or None)
    from .runtime.memory import peak_rss_mb

    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def measured_bandwidth_gb_s(size_mb: int = 256, repeats: int = 5) -> float:
    """Memory bandwidth by timing large copies (read + write), best of a few."""
    a = np.ones(size_mb * 2**20 // 8)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - start)
    return 2 * a.nbytes / best / 1e9


def decode_bytes_per_token(model_dir: Path, fp16_read_as_fp32: bool = False) -> float:
    """Weight bytes one batch-1 decode step reads: k/E of the experts, one row of each embedding table
    (a Gather), everything else whole. ``fp16_read_as_fp32``: count fp16 weights of other ops twice, as ONNX
    Runtime's CPU EP holds them (it has no fp16 MatMul: casts are inserted and folded into fp32 copies at
    load, measured with 1.31)."""
    import onnx_ir as ir

    from .runtime import Manifest

    manifest = Manifest.load(model_dir)
    graph = ir.load(model_dir / manifest.model_file).graph  # external data stays on disk
    experts = {v.name for n in graph if n.op_type in ("MoE", "QMoE") for v in n.inputs[2:] if v is not None}
    gathered = {n.inputs[0].name for n in graph if n.op_type == "Gather"}
    total = 0.0
    for value in graph.initializers.values():
        size = value.const_value.nbytes
        if value.name in experts:
            size *= manifest.experts_per_token / manifest.num_experts
        elif value.name in gathered:
            size /= value.shape[0]
        elif fp16_read_as_fp32 and value.dtype == ir.DataType.FLOAT16:
            size *= 2
        total += size
    return total


def export_generic(checkpoint: Path, fp32_dir: Path, output: Path) -> Path:
    """The baseline moerun replaces: torch.onnx (dynamo) of the Hugging Face model as it is, experts as
    ``experts_implementation="batched_mm"`` (gathers each token's expert matrices), no fusion."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from .converter.architectures import adapter_for
    from .converter.export import DecoderWithCache, export_decoder
    from .converter.output import save_model
    from .converter.passes import PinIrVersion
    from .runtime import Manifest
    from .runtime.manifest import decoder_io_names

    manifest = Manifest.load(fp32_dir)
    config = AutoConfig.from_pretrained(checkpoint)
    adapter = adapter_for(config)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, config=config, experts_implementation="batched_mm",
                                                 attn_implementation=adapter.attn_implementation).eval()
    graph = PinIrVersion()(export_decoder(DecoderWithCache(model), adapter.kv_shape(config))).model
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    save_model(graph, output)
    manifest.moe_layers, manifest.passes, manifest.fusions = 0, ["generic export (batched_mm)"], {}
    manifest.attention = "traced"
    manifest.inputs, manifest.outputs = decoder_io_names(manifest.num_layers)
    manifest.save(output)
    return output


def _measure(kind: str, path: Path, batch: int, length: int, new_tokens: int, threads: int | None,
             genai_python: Path | None = None, llamacpp_python: Path | None = None) -> dict:
    if kind == "genai":
        from .genai import measure_genai

        return measure_genai(path, batch, length, new_tokens, threads, genai_python)
    if kind.startswith("llamacpp-"):
        from .llamacpp import measure_llamacpp

        return measure_llamacpp(path, batch, length, new_tokens, threads, llamacpp_python)
    from .converter.report import run_worker

    stdout = run_worker([sys.executable, "-m", "moerun.bench", kind, path, batch, length, new_tokens, threads or 0],
                        f"bench {kind}")
    return json.loads(stdout.strip().splitlines()[-1])


def _with_llamacpp_pairs(variants: list[str]) -> list[str]:
    """"llamacpp" becomes one GGUF variant per chosen moerun export ("llamacpp-q4_0" for int4, ...), each
    right after its pair (F32 alone when no export is chosen)."""
    from .llamacpp import PAIRS

    if "llamacpp" not in variants:
        return variants
    out = [v for v in variants if v != "llamacpp"]
    for export in [v for v in EXPORTS if v in out]:
        if f"llamacpp-{PAIRS[export]}" not in out:  # int4 and int4-dense share Q4_0: once, after the first
            out.insert(out.index(export) + 1, f"llamacpp-{PAIRS[export]}")
    return out if any(v.startswith("llamacpp-") for v in out) else [*out, "llamacpp-f32"]


def run_bench(checkpoint: Path, batches: list[int], prompt_lens: list[int], new_tokens: int, variants: list[str],
              repeats: int, threads: int | None, workdir: Path | None, on_stage=None,
              on_progress=None) -> list[Record]:
    """``on_stage(name)`` names each preparation step and each round of measurements; ``on_progress(done, total,
    running)`` is called before each measurement (``running``: which) and once after the last."""
    from .converter.convert import convert
    from .converter.quantize import QuantizeOptions, quantize_model
    from .runtime import Manifest

    stage = on_stage or (lambda _: None)
    progress = on_progress or (lambda done, total, running="": None)
    variants = _with_llamacpp_pairs(variants)
    with tempfile.TemporaryDirectory(prefix="moerun-bench-") as tmp:
        root = Path(workdir or tmp)
        dirs: dict[str, Path] = {"hf": checkpoint}
        if any(v != "hf" for v in variants):
            stage("convert fp32")
            dirs["fp32"] = convert(checkpoint, root / "fp32", overwrite=True).output
        if "generic" in variants:
            stage("generic export (batched_mm)")
            dirs["generic"] = export_generic(checkpoint, dirs["fp32"], root / "generic")
        genai_py = None
        if "genai" in variants:
            from .genai import export_genai, genai_python

            genai_py = genai_python(stage)
            stage("onnxruntime-genai builder export (fp32)")
            dirs["genai"] = export_genai(checkpoint, root / "genai", genai_py)
        llamacpp_py, gguf_bytes = None, {}
        if any(v.startswith("llamacpp-") for v in variants):
            from .llamacpp import decode_bytes_per_token as gguf_bytes_per_token
            from .llamacpp import export_gguf, llamacpp_python

            llamacpp_py = llamacpp_python(stage)
            kinds = [v.removeprefix("llamacpp-") for v in variants if v.startswith("llamacpp-")]
            stage(f"llama.cpp's GGUF converter and quantizer ({', '.join(kinds)})")
            files = export_gguf(checkpoint, root / "gguf", kinds, threads, llamacpp_py)
            k = Manifest.load(dirs["fp32"]).experts_per_token
            for kind in kinds:
                dirs[f"llamacpp-{kind}"] = files[kind]
                gguf_bytes[f"llamacpp-{kind}"] = gguf_bytes_per_token(files[kind], k, llamacpp_py)
        for bits in (8, 4):
            for name, dense in ((f"int{bits}", "none"), (f"int{bits}-dense", f"int{bits}")):
                if name in variants:
                    stage(f"quantize {name}")
                    opts = QuantizeOptions(bits=bits, dense=dense)  # the defaults: block 64, accuracy_level 4
                    dirs[name] = quantize_model(dirs["fp32"], root / name, opts, overwrite=True).output
        stage("measure memory bandwidth")
        bandwidth = measured_bandwidth_gb_s()
        samples: dict[tuple, list[dict]] = {}
        total = repeats * len(batches) * len(prompt_lens) * len(variants)
        done = 0
        for r in range(repeats):
            stage(f"measure: round {r + 1} of {repeats}")
            for batch in batches:
                for length in prompt_lens:
                    for v in variants:  # interleaved: every variant once per round
                        progress(done, total, f"{v}, batch {batch}, prompt {length}")
                        samples.setdefault((v, batch, length), []).append(
                            _measure(v, dirs[v], batch, length, new_tokens, threads, genai_py, llamacpp_py))
                        done += 1
        progress(done, total)
        records = []
        for (v, batch, length), runs in samples.items():
            onnx_dir = dirs["fp32"] if v in BASELINES else dirs[v]  # baselines: fp32's weights
            file_mb = (sum(f.stat().st_size for f in dirs[v].glob("*.safetensors")) if v == "hf"
                       else dirs[v].stat().st_size if v in gguf_bytes
                       else sum(f.stat().st_size for f in dirs[v].glob("model.onnx*"))) / 2**20
            # HF eager reads the same weights as fp32; a GGUF, its own tensors
            per_token = gguf_bytes[v] if v in gguf_bytes else decode_bytes_per_token(onnx_dir)
            bound = bandwidth * 1e9 / per_token
            med = {f: statistics.median(x[f] for x in runs) for f in FIELDS}
            spread = {f: [min(x[f] for x in runs), max(x[f] for x in runs)] for f in FIELDS}
            hf = samples.get(("hf", batch, length))
            records.append(Record(v, batch, length, new_tokens, med["prefill_tok_s"], med["decode_tok_s"],
                                  med["ttft_ms"], med["peak_rss_mb"], file_mb, per_token, bound,
                                  100 * med["decode_tok_s"] / bound if batch == 1 else None,
                                  len(runs), spread, _agreement(runs[0]["tokens"], hf[0]["tokens"]) if hf else None))
        return records


def pairs_markdown(records: list[Record]) -> str:
    """moerun's exports against llama.cpp's GGUF of the same precision (int4 / Q4_0, ...): ratios above 1
    mean moerun is faster. Empty without llama.cpp records."""
    from .llamacpp import PAIRS

    by = {(r.variant, r.batch, r.prompt_len): r for r in records}
    lines = ["| moerun | llama.cpp | batch | prompt | decode tok/s | llama.cpp decode | moerun / llama.cpp | "
             "prefill tok/s | llama.cpp prefill | moerun / llama.cpp |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.variant not in PAIRS or (f"llamacpp-{PAIRS[r.variant]}", r.batch, r.prompt_len) not in by:
            continue
        g = by[f"llamacpp-{PAIRS[r.variant]}", r.batch, r.prompt_len]
        lines.append(f"| {r.variant} | {PAIRS[r.variant].upper()} | {r.batch} | {r.prompt_len} | {r.decode_tok_s:.1f} "
                     f"| {g.decode_tok_s:.1f} | {r.decode_tok_s / g.decode_tok_s:.2f}x | {r.prefill_tok_s:.0f} "
                     f"| {g.prefill_tok_s:.0f} | {r.prefill_tok_s / g.prefill_tok_s:.2f}x |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def _agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Share of positions where two greedy runs on the same prompts chose the same token."""
    pairs = [(a, b) for x, y in zip(tokens, reference) for a, b in zip(x, y)]
    return sum(a == b for a, b in pairs) / max(len(pairs), 1)


def write_json(records: list[Record], path: Path) -> None:
    path.write_text(json.dumps([asdict(r) for r in records], indent=2) + "\n")


def markdown(records: list[Record]) -> str:
    """The side-by-side table, with decode and prefill speed-ups over Hugging Face eager."""
    base = {(r.batch, r.prompt_len): r for r in records if r.variant == "hf"}
    lines = ["| variant | batch | prompt | decode tok/s | vs HF | prefill tok/s | vs HF | TTFT ms | peak RSS MB | "
             "file MB | % of bandwidth bound | greedy = HF |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        hf = base.get((r.batch, r.prompt_len))
        dec = f"{r.decode_tok_s / hf.decode_tok_s:.2f}x" if hf else ""
        pre = f"{r.prefill_tok_s / hf.prefill_tok_s:.2f}x" if hf else ""
        pct = f"{r.bound_pct:.0f}%" if r.bound_pct is not None else ""
        same = f"{100 * r.hf_agreement:.0f}%" if r.hf_agreement is not None else ""
        lo, hi = r.spread["decode_tok_s"]
        lines.append(f"| {r.variant} | {r.batch} | {r.prompt_len} | {r.decode_tok_s:.1f} ({lo:.1f}..{hi:.1f}) | {dec} "
                     f"| {r.prefill_tok_s:.0f} | {pre} | {r.ttft_ms:.1f} | {r.peak_rss_mb:.0f} | {r.file_mb:.1f} "
                     f"| {pct} | {same} |")
    pairs = pairs_markdown(records)
    return "\n".join(lines) + "\n" + (f"\nmoerun against llama.cpp, same precision:\n\n{pairs}" if pairs else "")


if __name__ == "__main__":
    worker(sys.argv[1:])
