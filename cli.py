"""The `moerun` command line. Errors are one line on stderr and exit code 1, never a traceback."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from .runtime.errors import MoerunError
from .runtime.session import PROVIDERS

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


class _Group(click.Group):
    """Turns MoerunError into click's one-line 'Error: ...' and exit code 1, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MoerunError as e:
            raise click.ClickException(str(e)) from None


def _quiet_libraries() -> None:
    """The exporter and its dependencies log and warn a lot that users cannot act on."""
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("torch", "torch.onnx", "onnxscript", "onnx_ir", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _quiet_converter_libraries() -> None:
    """torch resets its loggers' levels on import, so these are set after the converter is imported."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    for name in ("torch", "torch.onnx", "torch.onnx._internal.exporter._registration"):
        logging.getLogger(name).setLevel(logging.ERROR)


@click.group(cls=_Group)
@click.version_option(package_name="moerun")
def main() -> None:
    """Bring Mixture-of-Experts models to production on ONNX Runtime."""
    _quiet_libraries()


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def run_convert(source: Path, output: Path, **options):
    """convert() with a live status line per stage on stderr."""
    from .converter.convert import convert

    _quiet_converter_libraries()
    with err.status("checking the checkpoint") as status:
        def on_stage(name: str) -> None:
            status.update(f"[bold]{name}[/bold]")
            err.print(f"  • {name}")

        result = convert(source, output, on_stage=on_stage, **options)
    return result


def _quant_options(f):
    """Options shared by `quantize` and `convert --quantize` (see QuantizeOptions for the defaults)."""
    for opt in reversed([
        click.option("--block-size", type=click.Choice(["0", "16", "32", "64", "128"]), default="64", show_default=True,
                     help="Quantization block along K; 0 = one scale per output row (a slow path on CPU)."),
        click.option("--scheme", type=click.Choice(["symmetric", "asymmetric"]), default="symmetric",
                     show_default=True, help="asymmetric writes zero points."),
        click.option("--method", type=click.Choice(["rtn", "mse"]), default="mse", show_default=True,
                     help="rtn: abs-max round-to-nearest; mse: per-group clip search minimising weight error."),
        click.option("--dense", type=click.Choice(["none", "int8", "int4"]), default="none", show_default=True,
                     help="Also quantize non-expert MatMuls to MatMulNBits (ONNX Runtime's quantizer)."),
        click.option("--fp16", is_flag=True, help="The rest of the graph and its activations in fp16."),
        click.option("--accuracy-level", type=click.IntRange(0, 4), default=4, show_default=True,
                     help="ONNX Runtime accuracy_level: 4 = int8 activations on CPU (2x faster decoding, "
                          "no measurable quality cost); 0 = fp32 activations."),
    ]):
        f = opt(f)
    return f


def _quant(bits: int, block_size: str, scheme: str, method: str, dense: str, fp16: bool, accuracy_level):
    from .converter.quantize import QuantizeOptions

    return QuantizeOptions(bits=bits, block_size=int(block_size), scheme=scheme, method=method, dense=dense,
                           fp16=fp16, accuracy_level=accuracy_level)


def _print_layers(layers: list[dict]) -> None:
    worst = max(max(r["fc1_rel_rmse"], r["fc2_rel_rmse"]) for r in layers)
    mean = sum(r["fc1_rel_rmse"] + r["fc2_rel_rmse"] for r in layers) / (2 * len(layers))
    err.print(f"expert weight error (relative RMS): mean {mean:.4f}, worst layer {worst:.4f}")


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output model directory.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--verify", is_flag=True, help="Compare against the PyTorch model; exit 1 over tolerance.")
@click.option("--tolerance", type=float, default=None, help="Max abs logit difference for --verify.")
@click.option("--quantize", "quantize", type=click.Choice(["int4", "int8"]), default=None,
              help="Quantize the expert weights in the same run (QMoE).")
@click.option("--no-fusions", is_flag=True, help="Skip the ORT fusions (attention, RMSNorm, rotary).")
@click.option("--source", "source_format", type=click.Choice(["hf", "fairseq"]), default="hf", show_default=True,
              help="SOURCE is a Hugging Face directory or a fairseq MoE checkpoint (shared + rank files).")
@_quant_options
def convert(source: Path, output: Path, dtype: str, overwrite: bool, verify: bool, tolerance: float | None,
            quantize: str | None, no_fusions: bool, source_format: str, **quant) -> None:
    """Convert an MoE checkpoint SOURCE (Hugging Face directory or fairseq) to ONNX."""
    options = _quant(int(quantize[3:]), **quant) if quantize else None
    result = run_convert(source, output, dtype=dtype, overwrite=overwrite, verify=verify, tolerance=tolerance,
                         quantize=options, fusions=not no_fusions, source_format=source_format)
    m = result.manifest
    if m.fusions:
        err.print("ORT fusions: " + ", ".join(f"{k} {v}" for k, v in m.fusions.items()))
    err.print(f"{m.architecture}: {m.moe_layers} MoE layers fused ({m.num_experts} experts, top-{m.experts_per_token}),"
              f" ONNX {_human(result.onnx_bytes)} from {_human(result.checkpoint_bytes)} of checkpoint")
    if m.quantization:
        _print_layers(m.quantization["layers"])
    if result.report:
        r = result.report
        limit = f"tolerance {r.tolerance:g}" if r.tolerance is not None else "no tolerance: quantized, reported only"
        err.print(f"verify: max |Δlogits| prefill {r.max_abs_prefill:.2e}, decode {r.max_abs_decode:.2e} "
                  f"({limit}); greedy agreement {r.greedy_agreement:.1%} "
                  f"over {r.greedy_tokens} tokens: [green]passed[/green]")
    out.print(str(result.output))


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output model directory.")
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True)
@_quant_options
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--report", type=click.Path(path_type=Path), default=None,
              help="Also measure every standard variant on held-out text: Markdown here, JSON beside it.")
@click.option("--eval-text", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="Held-out text for --report (default: held-out Python standard-library modules).")
def quantize(source: Path, output: Path, bits: str, overwrite: bool, report: Path | None, eval_text: Path | None,
             **quant) -> None:
    """Quantize the experts of an exported model directory SOURCE to int4/int8 (QMoE)."""
    from .converter.quantize import quantize_model

    options = _quant(int(bits), **quant)
    with err.status("quantizing") as status:
        def on_stage(name: str) -> None:
            status.update(f"[bold]{name}[/bold]")
            err.print(f"  • {name}")

        result = quantize_model(source, output, options, overwrite=overwrite, on_stage=on_stage)
        if report:
            from .converter.report import build_report, stdlib_heldout_text, write_report

            text = eval_text.read_text(encoding="utf-8") if eval_text else stdlib_heldout_text()
            rows = build_report(source, text, options, on_stage=on_stage)
            write_report(rows, report, f"Quantization report: {source.name}")
    _print_layers(result.layers)
    err.print(f"{options.label}: {_human(result.onnx_bytes)} ({result.onnx_bytes / result.source_bytes:.3f}x of "
              f"{_human(result.source_bytes)})")
    if report:
        err.print(f"report: {report} and {report.with_suffix('.json')}")
    out.print(str(result.output))


def _sampling_options(f):
    for opt in reversed([
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True),
        click.option("--do-sample", is_flag=True, help="Sample instead of greedy decoding."),
        click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True),
        click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True),
        click.option("--seed", type=int, default=None),
        click.option("--provider", type=click.Choice(PROVIDERS), default="auto", show_default=True),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads."),
    ]):
        f = opt(f)
    return f


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", "prompts", multiple=True, required=True, help="A prompt; repeat for a batch.")
@_sampling_options
def generate(model_dir: Path, prompts: tuple[str, ...], max_new_tokens: int, do_sample: bool, temperature: float,
             top_k: int, top_p: float, seed: int | None, provider: str, threads: int | None) -> None:
    """Generate text from an exported model directory MODEL_DIR."""
    from .runtime import MoEModel

    model = MoEModel.load(model_dir, provider=provider, threads=threads)
    texts = model.generate(list(prompts), max_new_tokens, do_sample=do_sample, temperature=temperature,
                           top_k=top_k, top_p=top_p, seed=seed)
    err.print(f"{model.manifest.architecture} on {model.execution_provider}")
    for prompt, text in zip(prompts, texts):
        out.print(prompt + text, markup=False)
    s = model.last_stats
    err.print(f"prefill {s.prefill_tokens} tokens at {s.prefill_tokens_per_s:.0f} tok/s, "
              f"decode {s.decode_tokens} tokens at {s.decode_tokens_per_s:.0f} tok/s")


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--src", "src_lang", default=None, help="Source language code (NLLB: e.g. eng_Latn).")
@click.option("--tgt", "tgt_lang", default=None, help="Target language code (NLLB: e.g. fra_Latn).")
@click.option("--beams", type=click.IntRange(min=1), default=4, show_default=True, help="Beam size (1: greedy).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Sentences per batch.")
@click.option("--max-length", type=click.IntRange(min=2), default=200, show_default=True,
              help="Longest output, in tokens.")
@click.option("--length-penalty", type=float, default=1.0, show_default=True)
@click.option("--no-repeat-ngram-size", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--no-pruning", is_flag=True, help="Keep finished sentences in the batch (for comparison).")
@click.option("--provider", type=click.Choice(PROVIDERS), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads (default: all cores).")
def translate(model_dir: Path, src_lang: str | None, tgt_lang: str | None, beams: int, batch_size: int,
              max_length: int, length_penalty: float, no_repeat_ngram_size: int, no_pruning: bool, provider: str,
              threads: int | None) -> None:
    """Translate stdin to stdout, one sentence a line, with an encoder-decoder model in MODEL_DIR."""
    import sys
    import time

    from rich.progress import Progress

    from .runtime import MoEModel

    model = MoEModel.load(model_dir, provider=provider, threads=threads)
    if not model.manifest.is_seq2seq:
        raise MoerunError(f"{model_dir} holds a decoder-only model: use 'moerun generate'")
    lines = [line.rstrip("\n") for line in sys.stdin]
    err.print(f"{model.manifest.architecture} on {model.execution_provider}: {len(lines)} sentences, "
              f"beam {beams}, batch {batch_size}")
    # Sort by length so that a batch holds similar sentences (less padding); print in input order.
    order = sorted(range(len(lines)), key=lambda i: len(lines[i]))
    results: list[str] = [""] * len(lines)
    rows = tokens = 0
    start = time.perf_counter()
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("translating", total=len(lines))
        for b in range(0, len(order), batch_size):
            idx = [i for i in order[b: b + batch_size] if lines[i].strip()]
            if idx:
                texts = model.translate([lines[i] for i in idx], src_lang, tgt_lang, num_beams=beams,
                                        max_length=max_length, length_penalty=length_penalty,
                                        no_repeat_ngram_size=no_repeat_ngram_size, prune=not no_pruning)
                for i, text in zip(idx, texts):
                    results[i] = text
                rows += model.last_stats.extra["decoder_rows"]
                tokens += model.last_stats.prefill_tokens
            progress.advance(task, len(order[b: b + batch_size]))
    for text in results:
        out.print(text, markup=False, soft_wrap=True)
    seconds = time.perf_counter() - start
    err.print(f"{len(lines)} sentences, {tokens} source tokens in {seconds:.2f} s "
              f"({tokens / seconds if seconds else 0:.0f} input tok/s), {rows} decoder rows")


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Keep the demo checkpoint and ONNX model here (default: a temporary directory).")
@click.option("--provider", type=click.Choice(PROVIDERS), default="cpu", show_default=True)
def demo(workdir: Path | None, provider: str) -> None:
    """Build a small Mixtral-style MoE checkpoint, convert it, verify it, generate, and summarise."""
    from .demo import run_demo

    table = run_demo(workdir, provider, err)
    out.print(table)


def summary_table(rows: list[tuple[str, str]], title: str) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    return table


def _ints(value: str) -> list[int]:
    try:
        return [int(x) for x in value.split(",") if x]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--batch", default="1,4", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--prompt-len", default="128", show_default=True, help="Prompt lengths, comma-separated.")
@click.option("--new-tokens", type=click.IntRange(min=2), default=64, show_default=True)
@click.option("--compare", default="hf,generic", show_default=True,
              help="Baselines: hf (PyTorch eager), generic (torch.onnx, batched_mm experts), genai "
                   "(onnxruntime-genai's builder + C++ generator, in its own venv, built on first use).")
@click.option("--variants", default="fp32,int8,int4", show_default=True,
              help="moerun's exports: fp32, int8, int4 (quantization defaults: block 64, accuracy_level 4).")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Interleaved rounds; medians with min..max are reported.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads for every variant.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Records as JSON.")
@click.option("--markdown", "md_out", type=click.Path(path_type=Path), default=None, help="The table as Markdown.")
@click.option("--workdir", type=click.Path(path_type=Path), default=None, help="Keep the exported variants here.")
@click.option("--quick", is_flag=True, help="A smoke run: batch 1, prompt 16, 8 new tokens, 1 round.")
def bench(checkpoint: Path, batch: str, prompt_len: str, new_tokens: int, compare: str, variants: str, repeats: int,
          threads: int | None, json_out: Path | None, md_out: Path | None, workdir: Path | None, quick: bool) -> None:
    """Benchmark a Hugging Face MoE CHECKPOINT: baselines against moerun's exports, side by side."""
    from .bench import BASELINES, EXPORTS, markdown, run_bench, write_json

    chosen = []
    for option, given, allowed in (("--compare", compare, BASELINES), ("--variants", variants, EXPORTS)):
        names = [v for v in given.split(",") if v]
        unknown = set(names) - set(allowed)
        if unknown:
            raise MoerunError(f"{option}: unknown {', '.join(sorted(unknown))}; choose from {', '.join(allowed)}")
        chosen += names
    batches, lengths = _ints(batch), _ints(prompt_len)
    if quick:
        batches, lengths, new_tokens, repeats = [1], [16], 8, 1
    _quiet_converter_libraries_lazy()
    with err.status("preparing") as status:
        def on_stage(name: str) -> None:
            status.update(f"[bold]{name}[/bold]")

        records = run_bench(checkpoint, batches, lengths, new_tokens, chosen, repeats, threads, workdir, on_stage)
    table = markdown(records)
    click.echo(table)
    if json_out:
        write_json(records, json_out)
    if md_out:
        md_out.write_text(table)


def _quiet_converter_libraries_lazy() -> None:
    from .converter import convert  # noqa: F401  (imports torch, whose import resets logger levels)

    _quiet_converter_libraries()
