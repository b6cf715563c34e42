"""convert(): a Hugging Face (or fairseq) MoE checkpoint in, a moerun model directory out.

The stages, each a function below:
1. ``check``: options, the output location, the checkpoint's header and config, the family adapter.
2. ``export_graphs``: trace a skeleton of the model (no weights, so any size costs the same) with
   each MoE block swapped for one fused op, then run the graph passes (fusions, IR pin, checks).
3. ``bind_weights``: every weight becomes a LazyTensor over the checkpoint (``WeightStream``);
   quantization, when asked, wraps those again (int4/int8 computed per expert when written).
4. ``write``: the disk space is checked, then the tensors are computed and written one layer group
   at a time into a staging directory that is renamed into place only when everything (and
   ``--verify``) succeeded.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx_ir as ir
import torch
from torch import nn

from ..runtime import Manifest, MoEModel
from ..runtime.errors import MoerunError
from ..runtime.manifest import decoder_io_names, seq2seq_io_names, state_layers
from . import verify as verify_mod
from .architectures import adapter_for
from .architectures.base import FusedMoE
from .attention import DecoderWithFusedAttention, unfusable_reason
from .export import DecoderWithCache, export_decoder
from .export_seq2seq import DecoderStep, EncoderWithCrossKV, export_seq2seq
from .output import (
    SavedGraph,
    check_disk_space,
    check_output,
    copy_side_files,
    human_bytes,
    save_model,
    staged_directory,
)
from .passes import (
    BindWeights,
    CheckFusedMoE,
    FoldWeightTransposes,
    LogitsPositions,
    OrtFusions,
    PinIrVersion,
    ToFloat16,
)
from .passes.check_fused import recurrent_scans
from .quantize import QuantizeOptions, apply_quantization
from .recurrent import DecoderWithState
from .sources import Checkpoint, open_checkpoint
from .weights import REST, WeightStream, build_skeleton, group_of, load_groups

__all__ = ["ConvertResult", "DTYPES", "convert", "load_reference_model"]

log = logging.getLogger(__name__)

DTYPES = ("fp32", "fp16")
_TORCH = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass
class ConvertResult:
    output: Path
    manifest: Manifest
    files: list[str]
    checkpoint_bytes: int
    onnx_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)
    report: verify_mod.VerifyReport | None = None
    group_loads: int = 0  # layer groups loaded from the checkpoint (streaming: each once per graph)
    warnings: list[str] = field(default_factory=list)  # what the user should know (no tokenizer, ...)


class _Stages:
    """Names the current stage (log + callback) and times each one."""

    def __init__(self, on_stage: Callable[[str], None] | None) -> None:
        self.on_stage = on_stage
        self.seconds: dict[str, float] = {}
        self._name: str | None = None
        self._start = 0.0

    def __call__(self, name: str) -> None:
        self.finish()
        self._name, self._start = name, time.perf_counter()
        log.info(name)
        if self.on_stage:
            self.on_stage(name)

    def finish(self) -> dict[str, float]:
        if self._name is not None:
            self.seconds[self._name] = time.perf_counter() - self._start
            self._name = None
        return self.seconds


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _special_tokens(checkpoint: Checkpoint) -> dict:
    """eos/pad/bos (and the decoder start) from generation_config.json when present, else the config."""
    from transformers import GenerationConfig

    cfg = checkpoint.config
    gen = None
    if checkpoint.path.is_dir() and (checkpoint.path / "generation_config.json").is_file():
        try:
            gen = GenerationConfig.from_pretrained(checkpoint.path)
        except (OSError, ValueError):
            gen = None

    def pick(name: str):
        value = getattr(gen, name, None) if gen is not None else None
        return value if value is not None else getattr(cfg, name, None)

    return {"eos": _token_ids(pick("eos_token_id")), "pad": pick("pad_token_id"), "bos": pick("bos_token_id"),
            "decoder_start": pick("decoder_start_token_id")}


# --- 1. check ------------------------------------------------------------------------------------

def check(source: Path, output: Path, dtype: str, overwrite: bool, quantize: QuantizeOptions | None,
          source_format: str) -> tuple[Checkpoint, object]:
    """Everything cheap, before the first stage: bad input fails in one line, before minutes of work."""
    if dtype not in DTYPES:
        raise MoerunError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    check_output(output, overwrite, source)
    checkpoint = open_checkpoint(source, source_format)
    adapter = adapter_for(checkpoint.config)
    if quantize is not None:
        hidden, inter = adapter.expert_dims(checkpoint.config)
        try:
            quantize.spec.check(2 * inter, hidden, "fc1")
            quantize.spec.check(hidden, inter, "fc2")
        except ValueError as e:
            raise MoerunError(f"cannot quantize this model's experts: {e}") from None
    return checkpoint, adapter


# --- 2. export graphs ----------------------------------------------------------------------------

def export_modules(model: nn.Module, adapter, fused_attention: bool) -> dict[str, nn.Module]:
    """The modules the graphs are traced from, and their weights computed from: ``model`` with each
    MoE block swapped for the fused op, wrapped for KV-cache I/O; by graph file name."""
    adapter.swap_moe_blocks(model)
    if getattr(adapter, "seq2seq", False):
        layers = adapter.decoder_layers(model.config)
        return {"encoder.onnx": EncoderWithCrossKV(model, adapter.cross_attention(model)),
                "decoder.onnx": DecoderStep(model, layers)}
    if adapter.state_shapes(model.config):  # hybrid: convolution / recurrent states beside the KV cache
        return {"model.onnx": DecoderWithState(model, adapter)}
    if fused_attention:
        return {"model.onnx": DecoderWithFusedAttention(model, model.config.max_position_embeddings)}
    return {"model.onnx": DecoderWithCache(model)}


@dataclass
class Exported:
    """The traced graphs (weights not bound yet) and what the manifest says about them."""

    graphs: dict[str, ir.Model]
    moe_layers: dict[str, int]
    fused_attention: bool
    fusions: dict[str, int]
    passes: list[str]


def export_graphs(checkpoint: Checkpoint, adapter, dtype: str, fusions: bool) -> Exported:
    """Trace the model without its weights and run the graph passes."""
    config = checkpoint.config
    seq2seq = getattr(adapter, "seq2seq", False)
    # Encoder-decoders are traced in fp32 and converted by ONNX Runtime's float16 converter: their PyTorch
    # code has data-dependent fp16-only branches (inf clamping) that torch.export cannot trace.
    trace_dtype = "fp32" if seq2seq else dtype
    skeleton = build_skeleton(config, _TORCH[trace_dtype], adapter.attn_implementation)
    fused_attention = fusions and adapter.fused_attention and not seq2seq and not adapter.state_shapes(config)
    if fused_attention and (reason := unfusable_reason(skeleton)):
        log.info("attention stays traced: %s", reason)
        fused_attention = False
    modules = export_modules(skeleton, adapter, fused_attention)
    moe = sum(isinstance(m, FusedMoE) for m in skeleton.modules())
    kv = adapter.kv_shape(config)
    if seq2seq:
        encoder_moe = sum(isinstance(m, FusedMoE) for m in modules["encoder.onnx"].encoder.modules())
        graphs = dict(zip(modules, export_seq2seq(modules["encoder.onnx"], modules["decoder.onnx"], kv)))
        moe_layers = {"encoder.onnx": encoder_moe, "decoder.onnx": moe - encoder_moe}
    else:
        graphs = {"model.onnx": export_decoder(modules["model.onnx"], kv)}
        moe_layers = {"model.onnx": moe}
    fusion_counts: dict[str, int] = {}
    names: list[str] = []
    scans = recurrent_scans(state_layers(adapter.layer_types(config), adapter.state_shapes(config)))
    for name, model in graphs.items():
        passes = [FoldWeightTransposes()] + ([OrtFusions()] if fusions else [])
        passes += [] if seq2seq else [LogitsPositions()]
        passes += [PinIrVersion(), CheckFusedMoE(moe_layers[name], scans)]
        for p in passes:
            model = p(model).model
        graphs[name] = model
        names = [type(p).__name__ for p in passes]
        for fusion, n in (passes[1].counts if fusions else {}).items():
            fusion_counts[fusion] = fusion_counts.get(fusion, 0) + n
    return Exported(graphs, moe_layers, fused_attention, fusion_counts, names)


# --- 3. bind weights -----------------------------------------------------------------------------

def bind_weights(exported: Exported, checkpoint: Checkpoint, adapter) -> WeightStream:
    """Bind every weight of the graphs to the checkpoint (LazyTensors, read when written)."""
    # Weights are loaded in the checkpoint's dtype (half the memory of fp32 for bf16 releases); encoder-decoder
    # adapters compute with them (NLLB-MoE folds its expert output scale into fc2), so they load in fp32.
    dtype = torch.float32 if getattr(adapter, "seq2seq", False) else checkpoint.dtype
    skeleton = build_skeleton(checkpoint.config, dtype, adapter.attn_implementation)
    stream = WeightStream(skeleton, checkpoint.tensors,
                          lambda model: export_modules(model, adapter, exported.fused_attention))
    for name, model in exported.graphs.items():
        exported.graphs[name] = BindWeights(stream, name)(model).model
    return stream


# --- verify's reference ----------------------------------------------------------------------------

def truncated_config(config, layers: int):
    """``config`` with only its first ``layers`` decoder layers (per-layer lists cut to match)."""
    total = config.num_hidden_layers
    config = copy.deepcopy(config)
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == total:
            setattr(config, key, value[:layers])
    config.num_hidden_layers = layers
    return config


def _checkpoint_for(checkpoint: Checkpoint, config) -> Checkpoint:
    """The same checkpoint seen through a truncated config: only the tensors of its layers."""
    layers = getattr(config, "num_hidden_layers", None)
    keep = {k: v for k, v in checkpoint.tensors.items()
            if (g := group_of(k)) == REST or int(g.rpartition(".")[2]) < layers}
    return Checkpoint(checkpoint.path, config, keep, checkpoint.dtype, checkpoint.num_bytes,
                      checkpoint.source_format, checkpoint.quantized)


def load_reference_model(checkpoint: Checkpoint, adapter) -> nn.Module:
    """The Hugging Face model with the checkpoint's weights in fp32 (transformers' own loader), as the
    oracle of --verify."""
    model = build_skeleton(checkpoint.config, torch.float32, adapter.attn_implementation)
    load_groups(model, checkpoint.tensors, list(checkpoint.tensors))
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise MoerunError(f"{checkpoint.path}: no weights for {', '.join(missing[:3])}"
                          f"{' and more' if len(missing) > 3 else ''}")
    adapter.prepare_reference(model)
    return model


# --- convert ---------------------------------------------------------------------------------------

def _manifest(checkpoint: Checkpoint, adapter, exported: Exported, dtype: str, tokens: dict) -> Manifest:
    from .. import __version__

    config = checkpoint.config
    seq2seq = getattr(adapter, "seq2seq", False)
    kv = adapter.kv_shape(config)
    states = {} if seq2seq else adapter.state_shapes(config)
    layer_types = adapter.layer_types(config) if states else []
    if seq2seq:
        num_layers = adapter.decoder_layers(config)
        inputs, outputs = seq2seq_io_names(num_layers)["decoder"]
    else:
        num_layers = config.num_hidden_layers
        inputs, outputs = decoder_io_names(num_layers, positions=not exported.fused_attention,
                                           state_layers=state_layers(layer_types, states))
    return Manifest(
        architecture=adapter.architectures[0],
        model_type=config.model_type,
        kind="seq2seq" if seq2seq else "decoder",
        model_file="decoder.onnx" if seq2seq else "model.onnx",
        encoder_file="encoder.onnx" if seq2seq else None,
        encoder_moe_layers=exported.moe_layers.get("encoder.onnx", 0),
        decoder_start_token_id=tokens["decoder_start"] if seq2seq else None,
        num_layers=num_layers,
        num_kv_heads=kv.heads,
        head_dim=kv.key_dim,
        value_head_dim=kv.value_dim,
        vocab_size=config.vocab_size,
        hidden_size=getattr(config, "hidden_size", None) or config.d_model,
        num_experts=adapter.num_experts(config),
        experts_per_token=adapter.experts_per_token(config),
        moe_layers=sum(exported.moe_layers.values()),
        dtype=dtype,
        attention="gqa" if exported.fused_attention else "traced",
        layer_types=layer_types,
        states=states,
        inputs=inputs,
        outputs=outputs,
        passes=list(exported.passes),
        fusions=exported.fusions,
        eos_token_id=tokens["eos"],
        pad_token_id=tokens["pad"],
        bos_token_id=tokens["bos"],
        source=str(checkpoint.path.resolve()),
        moerun_version=__version__,
    )


def _write_graphs(graphs: dict[str, ir.Model], directory: Path,
                  on_bytes: Callable[[int], None] | None) -> dict[str, SavedGraph]:
    return {name: save_model(model, directory, name, on_bytes) for name, model in graphs.items()}


@dataclass
class _Pipeline:
    """Stages 2-3 with the options of one conversion: the same for the model and, with --verify-layers,
    for its first layers."""

    adapter: object
    dtype: str  # the graph's: fp16 for --dtype fp16 and for decoders with --quantize --fp16
    fusions: bool
    quantize: QuantizeOptions | None
    tokens: dict

    @property
    def seq2seq(self) -> bool:
        return getattr(self.adapter, "seq2seq", False)

    def build(self, checkpoint: Checkpoint) -> tuple[Exported, WeightStream, Manifest]:
        exported = export_graphs(checkpoint, self.adapter, self.dtype, self.fusions)
        stream = bind_weights(exported, checkpoint, self.adapter)
        manifest = _manifest(checkpoint, self.adapter, exported, self.dtype, self.tokens)
        # encoder-decoders are traced in fp32 and reach fp16 through ONNX Runtime's converter
        fp16_pass = self.seq2seq and self.dtype == "fp16"
        if self.quantize is not None:
            exported.graphs, _ = apply_quantization(exported.graphs, manifest, self.quantize, fp16_pass=fp16_pass)
        elif fp16_pass:
            for name, model in exported.graphs.items():
                exported.graphs[name] = ToFloat16()(model).model
            manifest.passes.append("ToFloat16")
        return exported, stream, manifest

    def reference(self, checkpoint: Checkpoint):
        """What --verify compares against: the PyTorch model's outputs on seeded inputs."""
        model = load_reference_model(checkpoint, self.adapter)
        tokens = self.tokens
        pad = tokens["pad"] if tokens["pad"] is not None else (tokens["eos"][0] if tokens["eos"] else 0)
        if self.seq2seq:
            return verify_mod.reference_seq2seq(model, tokens["eos"], pad, tokens["decoder_start"])
        fused = self.fusions and self.adapter.fused_attention and not unfusable_reason(model)
        return verify_mod.reference(model, tokens["eos"], pad, right_padded=fused)

    def verify(self, directory: Path, ref, tolerance: float | None) -> verify_mod.VerifyReport:
        """Compare the model written in ``directory`` with ``ref``; raises VerificationError on failure."""
        tol = tolerance
        if tol is None and self.quantize is None:  # a quantized model is reported on, not held to fp tolerance
            tol = verify_mod.DEFAULT_TOLERANCE[self.dtype]
        compare = verify_mod.compare_seq2seq if self.seq2seq else verify_mod.compare
        report = compare(MoEModel.load(directory, provider="cpu"), ref, tol)
        report.min_agreement = None if self.quantize is not None else verify_mod.MIN_AGREEMENT[self.dtype]
        return report


def _check_verify_layers(verify_layers: int | None, checkpoint: Checkpoint, seq2seq: bool) -> None:
    if verify_layers is None:
        return
    layers = getattr(checkpoint.config, "num_hidden_layers", 0)
    if seq2seq:
        raise MoerunError("--verify-layers applies to decoder-only models; use --verify")
    if not 1 <= verify_layers < layers:
        raise MoerunError(f"--verify-layers must be between 1 and {layers - 1} for this {layers}-layer model")


def _write_side_files(checkpoint: Checkpoint, staging: Path) -> list[str]:
    """Tokenizer, generation and model config beside the graphs (the config as moerun read it)."""
    files = copy_side_files(checkpoint.path if checkpoint.path.is_dir() else checkpoint.path.parent, staging)
    config_file = staging / "config.json"
    if not config_file.is_file():  # fairseq: the Hugging Face config it was mapped to
        checkpoint.config.to_json_file(config_file)
        files.append("config.json")
    if checkpoint.quantized:  # the weights are no longer MXFP4/FP8: drop what says they are
        config_json = json.loads(config_file.read_text())
        config_json.pop("quantization_config", None)
        config_file.write_text(json.dumps(config_json, indent=2) + "\n")
    return files


def convert(
    source: str | Path,
    output: str | Path,
    *,
    dtype: str = "fp32",
    overwrite: bool = False,
    verify: bool = False,
    verify_layers: int | None = None,
    tolerance: float | None = None,
    quantize: QuantizeOptions | None = None,
    fusions: bool = True,
    source_format: str = "hf",
    on_stage: Callable[[str], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> ConvertResult:
    """Export ``source`` to ``output`` with one com.microsoft.MoE node per MoE layer.

    ``source_format`` is "hf" (a Hugging Face directory) or "fairseq" (an MoE checkpoint as fairseq
    writes it: ``<name>-shared.pt`` and ``<name>-rank-N.pt``).
    ``fusions`` fuses attention, RMSNorm and rotary subgraphs into ONNX Runtime's contrib ops.
    With ``quantize``, the experts (and optionally dense weights) are quantized as they are written.
    ``verify`` compares against PyTorch; ``verify_layers`` does it on the model cut to its first N
    layers (real weights, the same pipeline) for checkpoints too big to run whole in PyTorch.
    ``on_progress(done, total)`` reports the bytes written. Memory stays at about one layer of the
    model; nothing is written to ``output`` unless every stage (and the verification) succeeds.
    """
    source, output = Path(source), Path(output)
    if dtype == "fp16" and quantize is not None:
        quantize = replace(quantize, fp16=True)  # one request: --dtype fp16 and --quantize --fp16 write the same graph
    checkpoint, adapter = check(source, output, dtype, overwrite, quantize, source_format)
    graph_dtype = "fp16" if dtype == "fp16" or (quantize is not None and quantize.fp16) else "fp32"
    pipeline = _Pipeline(adapter, graph_dtype, fusions, quantize, _special_tokens(checkpoint))
    _check_verify_layers(verify_layers, checkpoint, pipeline.seq2seq)
    stage = _Stages(on_stage)

    ref = first_layers = None
    if verify or verify_layers:
        stage("reference outputs (PyTorch)")
        if verify_layers:
            first_layers = _checkpoint_for(checkpoint, truncated_config(checkpoint.config, verify_layers))
        ref = pipeline.reference(first_layers or checkpoint)

    stage("export ONNX (tracing without weights)")
    exported, stream, manifest = pipeline.build(checkpoint)
    manifest.max_positions = getattr(checkpoint.config, "max_position_embeddings", None)
    manifest.source_format = checkpoint.source_format
    manifest.source_quantization = list(checkpoint.quantized)
    total = sum(v.const_value.nbytes for g in exported.graphs.values() for v in g.graph.initializers.values()
                if v.const_value is not None)
    check_disk_space(output, total)

    report = None
    with staged_directory(output, overwrite) as staging:
        if first_layers is not None:
            # the first layers, streamed and written by the same pipeline, against PyTorch: before the long write
            stage(f"verify the first {verify_layers} layers (ONNX Runtime)")
            small, _, small_manifest = pipeline.build(first_layers)
            target = staging / ".verify"
            target.mkdir()
            _write_graphs(small.graphs, target, None)
            small_manifest.save(target)
            report = pipeline.verify(target, ref, tolerance)
            shutil.rmtree(target)
            manifest.verify = {**report.to_dict(),
                               "scope": f"first {verify_layers} of {checkpoint.config.num_hidden_layers} layers"}
            verify_mod.check(report)
        stage(f"write weights ({human_bytes(total)})")
        saved = _write_graphs(exported.graphs, staging, _Progress(on_progress, total))
        files = [f for s in saved.values() for f in s.files] + _write_side_files(checkpoint, staging)
        manifest.weights = {name: {"tensors": len(s.sha256), "bytes": s.tensor_bytes, "sha256": s.sha256}
                            for name, s in saved.items()}
        if ref is not None and first_layers is None:
            stage("verify (ONNX Runtime)")
            manifest.save(staging)
            report = pipeline.verify(staging, ref, tolerance)
            manifest.verify = {**report.to_dict(), "scope": "whole model"}
            verify_mod.check(report)
        manifest.save(staging)
        files.append("moerun.json")
        onnx_bytes = sum((staging / f).stat().st_size for f in files if ".onnx" in f)
    return ConvertResult(output, manifest, files, checkpoint.num_bytes, onnx_bytes, stage.finish(), report,
                         stream.loads, _warnings(checkpoint, exported, total))


def _warnings(checkpoint: Checkpoint, exported: Exported, total: int) -> list[str]:
    notes = []
    directory = checkpoint.path if checkpoint.path.is_dir() else checkpoint.path.parent
    if not (directory / "tokenizer.json").is_file():
        notes.append(f"{checkpoint.path} has no tokenizer.json: the model takes token ids only "
                     "(moerun generate --prompt-ids, MoEModel.generate_ids)")
    rotary = sum(v.const_value.nbytes for g in exported.graphs.values() for n, v in g.graph.initializers.items()
                 if n in ("cos_cache", "sin_cache"))
    if rotary > total / 4:
        positions = getattr(checkpoint.config, "max_position_embeddings", "?")
        notes.append(f"rotary tables for {positions} positions take {human_bytes(rotary)} of the "
                     f"{human_bytes(total)} written (max_position_embeddings sizes them)")
    for note in notes:
        log.info(note)  # the CLI prints ConvertResult.warnings
    return notes


class _Progress:
    """Adds up the bytes written and reports (done, total)."""

    def __init__(self, callback: Callable[[int, int], None] | None, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def __call__(self, n: int) -> None:
        self.done += n
        if self.callback:
            self.callback(self.done, self.total)
