"""The `moerun` command line. Errors are one line on stderr and exit code 1, never a traceback."""

from __future__ import annotations

import io
import logging
import os
import signal
import warnings
from pathlib import Path

import click

from .console import StageDisplay, err, out, quiet_converter_libraries, run_convert, stages
from .console import human_size as _human
from .runtime.errors import MoerunError
from .runtime.memory import peak_rss_mb
from .runtime.session import PROVIDERS


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


@click.group(cls=_Group)
@click.version_option(package_name="moerun")
def main() -> None:
    """Bring Mixture-of-Experts models to production on ONNX Runtime."""
    _quiet_libraries()
    # `kill` (SIGTERM) unwinds like Ctrl-C: half-written outputs are removed on the way out
    signal.signal(signal.SIGTERM, _terminated)


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


QUANT_OPTIONS = ("block_size", "scheme", "method", "dense", "fp16", "accuracy_level")


def _quant_options(with_quantize: bool = False):
    """Options shared by `quantize` and `convert --quantize` (see QuantizeOptions for the defaults);
    ``with_quantize``: convert's, which apply only with --quantize (the help says so)."""
    only = "[with --quantize] " if with_quantize else ""
    fp16 = ("the same as --dtype fp16: either gives an fp16 graph" if with_quantize else
            "on the CPU it saves disk, not memory or time")

    def decorate(f):
        for opt in reversed([
            click.option("--block-size", type=click.Choice(["0", "16", "32", "64", "128"]), default="64",
                         show_default=True,
                         help=only + "Quantization block along K; 0 = one scale per output row (a slow path on CPU)."),
            click.option("--scheme", type=click.Choice(["symmetric", "asymmetric"]), default="symmetric",
                         show_default=True, help=only + "asymmetric writes zero points."),
            click.option("--method", type=click.Choice(["rtn", "mse"]), default="mse", show_default=True,
                         help=only + "rtn: abs-max round-to-nearest; mse: per-group clip search minimising weight "
                                     "error."),
            click.option("--dense", type=click.Choice(["none", "int8", "int4"]), default="none", show_default=True,
                         help=only + "Also quantize non-expert MatMuls to MatMulNBits (ONNX Runtime's quantizer)."),
            click.option("--fp16", is_flag=True,
                         help=only + f"The rest of the graph and its activations in fp16 ({fp16})."),
            click.option("--accuracy-level", type=click.IntRange(0, 4), default=4, show_default=True,
                         help=only + "ONNX Runtime accuracy_level: 4 = int8 activations on CPU (2x faster decoding, "
                                     "no measurable quality cost); 0 = fp32 activations."),
        ]):
            f = opt(f)
        return f

    return decorate


def _quant(bits: int, block_size: str, scheme: str, method: str, dense: str, fp16: bool, accuracy_level):
    from .converter.quantize import QuantizeOptions

    return QuantizeOptions(bits=bits, block_size=int(block_size), scheme=scheme, method=method, dense=dense,
                           fp16=fp16, accuracy_level=accuracy_level)


def _print_layers(layers: list[dict]) -> None:
    worst = max(max(r["fc1_rel_rmse"], r["fc2_rel_rmse"]) for r in layers)
    mean = sum(r["fc1_rel_rmse"] + r["fc2_rel_rmse"] for r in layers) / (2 * len(layers))
    err.print(f"expert weight error (relative RMS): mean {mean:.4f}, worst layer {worst:.4f}")


@main.command(short_help="Convert an MoE checkpoint to an ONNX model directory.")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output model directory.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Precision of the exported graph. fp16 is the export for CUDA (CUDA is untested); on the CPU it "
                   "saves disk, not memory or time. With --quantize, --fp16 is the same: either gives an fp16 graph.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--verify", is_flag=True, help="Compare against the PyTorch model; exit 1 over tolerance.")
@click.option("--verify-layers", type=click.IntRange(min=1), default=None,
              help="Verify on the model cut to its first N layers (real weights, same pipeline): for models "
                   "too big to run whole in PyTorch.")
@click.option("--tolerance", type=float, default=None, help="Max abs logit difference for --verify.")
@click.option("--quantize", "quantize", type=click.Choice(["int4", "int8"]), default=None,
              help="Quantize the expert weights in the same run (QMoE). The options marked [with --quantize] "
                   "apply only with it; without it they are refused.")
@click.option("--no-fusions", is_flag=True, help="Skip the ORT fusions (attention, RMSNorm, rotary).")
@click.option("--source", "source_format", type=click.Choice(["hf", "fairseq"]), default="hf", show_default=True,
              help="SOURCE is a Hugging Face directory or a fairseq MoE checkpoint (shared + rank files).")
@_quant_options(with_quantize=True)
def convert(source: Path, output: Path, dtype: str, overwrite: bool, verify: bool, verify_layers: int | None,
            tolerance: float | None, quantize: str | None, no_fusions: bool, source_format: str, **quant) -> None:
    """Convert an MoE checkpoint SOURCE (Hugging Face directory or fairseq) to ONNX.

    Weights are streamed: read, mapped, cast or quantized and written one layer at a time, so memory
    stays near one layer of the model whatever its size."""
    if not quantize:
        _refuse_without("--quantize", QUANT_OPTIONS)
    options = _quant(int(quantize[3:]), **quant) if quantize else None
    result = run_convert(source, output, dtype=dtype, overwrite=overwrite, verify=verify, verify_layers=verify_layers,
                         tolerance=tolerance, quantize=options, fusions=not no_fusions, source_format=source_format)
    m = result.manifest
    for note in result.warnings:
        err.print(f"[yellow]warning:[/yellow] {note}")
    written = next((v for k, v in result.seconds.items() if k.startswith("write")), 0.0)
    if written:
        err.print(f"wrote {_human(result.onnx_bytes)} in {written:.1f} s "
                  f"({result.onnx_bytes / written / 2**20:.0f} MB/s), peak memory {peak_rss_mb():.0f} MB")
    if m.fusions:
        err.print("ORT fusions: " + ", ".join(f"{k} {v}" for k, v in m.fusions.items()))
    err.print(f"{m.architecture}: {m.moe_layers} MoE layers fused ({m.num_experts} experts, top-{m.experts_per_token}),"
              f" ONNX {_human(result.onnx_bytes)} from {_human(result.checkpoint_bytes)} of checkpoint")
    if m.quantization:
        _print_layers(m.quantization["layers"])
    if result.report:
        r = result.report
        limit = f"tolerance {r.tolerance:g}" if r.tolerance is not None else "no tolerance: quantized, reported only"
        err.print(f"verify ({m.verify['scope']}): max |Δlogits| prefill {r.max_abs_prefill:.2e}, "
                  f"decode {r.max_abs_decode:.2e} ({limit}); greedy agreement with PyTorch "
                  f"{r.greedy_agreement:.1%} over {r.greedy_tokens} tokens, generation loop {r.loop_agreement:.0%}: "
                  "[green]passed[/green]")
    out.print(str(result.output))


@main.command(short_help="Quantize an exported model's experts to int4/int8.")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output model directory.")
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True)
@_quant_options()
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
    if report:
        _check_writable("--report", report, report.with_suffix(".json"))
    with stages("quantizing") as on_stage:
        try:
            result = quantize_model(source, output, options, overwrite=overwrite, on_stage=on_stage)
        except FileNotFoundError as e:  # the external data of a graph
            raise MoerunError(f"{e.filename}: no such file; {source} is incomplete: convert the model again") from None
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


def _prompt_ids(value: str) -> list[int]:
    try:
        return _ints(value)
    except click.BadParameter:
        raise MoerunError(f"--prompt-ids takes comma-separated token ids such as 1,15,27, got {value!r}") from None


@main.command(short_help="Generate text (or token ids) from an exported model.")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", "prompts", multiple=True, help="A prompt; repeat for a batch.")
@click.option("--prompt-ids", "prompt_ids", multiple=True, metavar="IDS",
              help="A prompt as comma-separated token ids (e.g. 1,15,27); repeat for a batch. Prints token ids: "
                   "for models without tokenizer files.")
@click.option("--echo", is_flag=True, help="Print the prompt before its continuation.")
@_sampling_options
def generate(model_dir: Path, prompts: tuple[str, ...], prompt_ids: tuple[str, ...], echo: bool, max_new_tokens: int,
             do_sample: bool, temperature: float, top_k: int, top_p: float, seed: int | None, provider: str,
             threads: int | None) -> None:
    """Generate from an exported model directory MODEL_DIR: each prompt's continuation on one line of stdout."""
    from .runtime import MoEModel

    if bool(prompts) == bool(prompt_ids):
        raise MoerunError("give the prompts either as text (-p/--prompt) or as token ids (--prompt-ids 1,15,27)")
    ids = [_prompt_ids(value) for value in prompt_ids]
    model = MoEModel.load(model_dir, provider=provider, threads=threads)
    sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if ids:
        lines = [",".join(map(str, [*prompt, *new] if echo else new))
                 for prompt, new in zip(ids, model.generate_ids(ids, max_new_tokens, **sampling))]
    elif model.tokenizer is None:
        raise MoerunError(f"{model_dir} has no tokenizer.json: give the prompts as token ids with --prompt-ids 1,15,27")
    else:
        lines = [prompt + text if echo else text
                 for prompt, text in zip(prompts, model.generate(list(prompts), max_new_tokens, **sampling))]
    err.print(f"{model.manifest.architecture} on {model.execution_provider}")
    for line in lines:
        click.echo(line)
    s = model.last_stats
    err.print(f"prefill {s.prefill_tokens} tokens at {s.prefill_tokens_per_s:.0f} tok/s, "
              f"decode {s.decode_tokens} tokens at {s.decode_tokens_per_s:.0f} tok/s, "
              f"peak memory {peak_rss_mb():.0f} MB")


@main.command(short_help="Translate stdin to stdout with an encoder-decoder model.")
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
    lines = _utf8_lines(sys.stdin.buffer.read())
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


@main.command(short_help="Serve a model over an OpenAI-compatible HTTP API.")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests decoded together (continuous batching on fused-attention models; traced-attention and "
                   "recurrent-state models batch the requests arriving together, statically).")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Requests waiting for a slot; past it the server answers 503 with Retry-After.")
@click.option("--max-len", type=click.IntRange(min=2), default=None,
              help="Tokens per request, prompt + max_tokens (default: the model's max positions, at most "
                   "4096; each slot's KV cache is allocated at start).")
@click.option("--api-key", default=None, envvar="MOERUN_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on /v1/* (prefer the environment variable: a command-line "
                   "key shows in ps).")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=16.0, show_default=True,
              help="Largest /v1 request body; a larger one is refused (413) before it is read whole.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=600.0, show_default=True,
              help="Seconds a request may take from arrival to its last token.")
@click.option("--provider", type=click.Choice(PROVIDERS), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--ray", "use_ray", is_flag=True, help="Serve as Ray Serve replicas (RAY_ADDRESS: join a cluster).")
@click.option("--ray-node-ip", default="127.0.0.1", show_default=True,
              help="Address of the local Ray head started by --ray (anyone reaching Ray's ports can run code on it: "
                   "loopback unless the replicas span machines).")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True, help="Ray Serve replicas.")
def serve(model_dir: Path, host: str, port: int, max_batch: int, max_queue: int, max_len: int | None,
          api_key: str | None, max_body_mb: float, timeout: float, provider: str, threads: int | None, use_ray: bool,
          ray_node_ip: str, replicas: int) -> None:
    """Serve MODEL_DIR over an OpenAI-compatible HTTP API (completions, chat, translations, /metrics)."""
    from .serve.launch import serve as run_server
    from .serve.settings import ServeSettings

    settings = ServeSettings(max_batch=max_batch, max_queue=max_queue, api_key=api_key, timeout=timeout,
                             max_len=max_len, max_body_bytes=int(max_body_mb * 2**20))
    run_server(model_dir, host, port, settings, provider, threads, use_ray, replicas, on_ready=err.print,
               ray_node_ip=ray_node_ip)


def _utf8_lines(data: bytes) -> list[str]:
    """Lines of UTF-8 text (universal newlines, as text-mode stdin reads them); other bytes are an error."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise MoerunError(f"stdin is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); convert it first, "
                          "e.g. iconv -f latin1 -t utf-8") from None
    return [line.rstrip("\n") for line in io.StringIO(text, newline=None)]


@main.command(short_help="Convert, verify, run and quantize a small trained MoE.")
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Keep the demo's ONNX models here (default: a temporary directory).")
@click.option("--provider", type=click.Choice(PROVIDERS), default="cpu", show_default=True)
def demo(workdir: Path | None, provider: str) -> None:
    """Convert a small trained MoE, verify it against PyTorch, generate, quantize to int4, and summarise."""
    from .demo import run_demo

    table = run_demo(workdir, provider, err, out)  # progress on stderr, results (continuations, table) on stdout
    out.print(table, soft_wrap=False)  # laid out at the terminal's width, or 80 columns


def _ints(value: str) -> list[int]:
    try:
        return [int(x) for x in value.split(",") if x]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@main.command(short_help="Benchmark a checkpoint: baselines beside moerun's exports.")
@click.argument("checkpoint", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--batch", default="1,4", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--prompt-len", default="128", show_default=True, help="Prompt lengths, comma-separated.")
@click.option("--new-tokens", type=click.IntRange(min=2), default=64, show_default=True)
@click.option("--compare", default="hf,generic", show_default=True,
              help="Baselines: hf (PyTorch eager), generic (torch.onnx, batched_mm experts), genai "
                   "(onnxruntime-genai's builder + C++ generator, in its own venv, built on first use), llamacpp "
                   "(llama.cpp via llama-cpp-python, compiled in its own venv on first use: F32/Q8_0/Q4_0 GGUF "
                   "beside fp32/int8/int4).")
@click.option("--variants", default="fp32,int8,int4", show_default=True,
              help="moerun's exports: fp32, int8, int4, int8-dense, int4-dense (-dense: attention and lm_head "
                   "quantized too; quantization defaults: block 64, accuracy_level 4).")
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
    _check_writable("--json", json_out)  # before minutes of measuring, not after
    _check_writable("--markdown", md_out)
    quiet_converter_libraries()
    with StageDisplay("preparing", unit="runs") as display:
        records = run_bench(checkpoint, batches, lengths, new_tokens, chosen, repeats, threads, workdir,
                            display.stage, display.progress)
    table = markdown(records)
    click.echo(table)
    if json_out:
        write_json(records, json_out)
    if md_out:
        md_out.write_text(table)


@main.command("inspect", short_help="What a model holds and which hosts can run it.")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="The report as JSON on stdout.")
@click.option("--strict", is_flag=True, help="Exit 1 if any op is outside the ONNX standard and com.microsoft domains.")
def inspect_command(model_dir: Path, as_json: bool, strict: bool) -> None:
    """What MODEL_DIR holds (I/O, ops, MoE nodes, sizes) and which ONNX Runtime hosts can run it."""
    from .console import inspection_table
    from .deploy.inspect import inspect_model

    if not model_dir.is_dir():
        raise MoerunError(f"{model_dir}: no such model directory")
    report = inspect_model(model_dir)
    if as_json:
        click.echo(report.to_json())
    else:
        out.print(inspection_table(report), soft_wrap=False)
    if strict and not report.strict_ok:
        raise MoerunError(f"{model_dir}: ops outside the ONNX standard and com.microsoft domains: "
                          f"{', '.join(report.foreign_ops)}")


@main.group(cls=_Group, short_help="Write a model for another ONNX Runtime host.")
def deploy() -> None:
    """Write a model directory for another ONNX Runtime host: onnxruntime-genai, Triton, ONNX tokenizer graphs."""


_DEPLOY_OUTPUT = click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
                              help="Output directory (a new one, outside MODEL_DIR).")
_DEPLOY_OVERWRITE = click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")


@deploy.command("genai", short_help="A directory onnxruntime-genai loads.")
@click.argument("model_dir", type=click.Path(path_type=Path))
@_DEPLOY_OUTPUT
@_DEPLOY_OVERWRITE
def deploy_genai(model_dir: Path, output: Path, overwrite: bool) -> None:
    """A directory onnxruntime_genai.Model(OUTPUT) loads: the graph, genai_config.json and the tokenizer files."""
    from .deploy.genai import export_genai_dir

    out.print(str(export_genai_dir(model_dir, output, overwrite=overwrite)))


@deploy.command("triton", short_help="A Triton model repository (onnxruntime backend).")
@click.argument("model_dir", type=click.Path(path_type=Path))
@_DEPLOY_OUTPUT
@_DEPLOY_OVERWRITE
@click.option("--name", default=None, help="Triton model name (default: MODEL_DIR's name).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads (CPU).")
@click.option("--max-length", type=click.IntRange(min=2), default=None,
              help="Fused attention: positions of each sequence's KV buffer (default: the model's, at most 4096).")
def deploy_triton(model_dir: Path, output: Path, overwrite: bool, name: str | None, threads: int | None,
                  max_length: int | None) -> None:
    """A Triton model repository OUTPUT: NAME/config.pbtxt and NAME/1/model.onnx (onnxruntime backend); a decoder is
    stateful (sequence batching with implicit KV state)."""
    from .deploy.triton import export_triton
    from .runtime import Manifest
    from .runtime.placement import ops_without_cuda_kernel

    written = export_triton(model_dir, output, name=name, overwrite=overwrite, threads=threads, max_length=max_length)
    if cpu_only := ops_without_cuda_kernel(Manifest.load(model_dir)):
        err.print(f"[yellow]warning:[/yellow] {', '.join(cpu_only)} have no fp32 CUDA kernels: on a GPU instance "
                  "they run on the CPU; convert with --dtype fp16 for GPU serving")
    out.print(str(written))


@deploy.command("tokenizer", short_help="Tokenizer and detokenizer ONNX graphs.")
@click.argument("model_dir", type=click.Path(path_type=Path))
@_DEPLOY_OUTPUT
@_DEPLOY_OVERWRITE
def deploy_tokenizer(model_dir: Path, output: Path, overwrite: bool) -> None:
    """OUTPUT/tokenizer.onnx and OUTPUT/detokenizer.onnx (onnxruntime-extensions): strings to ids and back."""
    from .deploy.tokenizer_onnx import export_tokenizer

    out.print(str(export_tokenizer(model_dir, output, overwrite=overwrite)))


def _refuse_without(option: str, names: tuple[str, ...]) -> None:
    """Options that only act with ``option`` are refused without it, not ignored."""
    ctx = click.get_current_context()
    given = [f"--{n.replace('_', '-')}" for n in names
             if ctx.get_parameter_source(n) not in (None, click.core.ParameterSource.DEFAULT)]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise MoerunError(f"{', '.join(given)} only {verb} with {option}: add {option} int4 or int8"
                          + (", or use --dtype fp16 for an fp16 graph" if given == ["--fp16"] else ""))


def _check_writable(option: str, *paths: Path | None) -> None:
    """A file the command will write at the end must be writable now: fail before the work, not after."""
    for path in paths:
        if path is None:
            continue
        if path.is_dir():
            raise MoerunError(f"{option} {path}: is a directory; give a file name")
        if not path.parent.is_dir():
            raise MoerunError(f"{option} {path}: the directory {path.parent} does not exist")
        if not os.access(path if path.exists() else path.parent, os.W_OK):
            raise MoerunError(f"{option} {path}: not writable")
