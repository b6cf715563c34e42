"""convert(): a Hugging Face MoE checkpoint directory in, a moerun model directory out."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime import Manifest, MoEModel
from ..runtime.errors import MoerunError
from ..runtime.manifest import decoder_io_names, seq2seq_io_names
from . import verify as verify_mod
from .architectures import adapter_for
from .attention import unfusable_reason
from .export import export_decoder
from .export_seq2seq import export_seq2seq
from .output import check_output, copy_side_files, save_model, staged_directory
from .passes import CheckFusedMoE, OrtFusions, PinIrVersion, ToFloat16
from .quantize import QuantizeOptions, apply_quantization
from .sources import open_checkpoint

__all__ = ["ConvertResult", "DTYPES", "convert"]

log = logging.getLogger(__name__)

DTYPES = ("fp32", "fp16")


@dataclass
class ConvertResult:
    output: Path
    manifest: Manifest
    files: list[str]
    checkpoint_bytes: int
    onnx_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)
    report: verify_mod.VerifyReport | None = None


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _special_tokens(model) -> tuple[list[int], int | None, int | None]:
    gen = getattr(model, "generation_config", None)
    cfg = model.config
    eos = _token_ids(getattr(gen, "eos_token_id", None) or cfg.eos_token_id)
    pad = getattr(gen, "pad_token_id", None)
    pad = pad if pad is not None else cfg.pad_token_id
    bos = getattr(gen, "bos_token_id", None)
    return eos, pad, bos if bos is not None else cfg.bos_token_id


def _decoder_start(model) -> int | None:
    start = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
    return start if start is not None else getattr(model.config, "decoder_start_token_id", None)


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


def convert(
    source: str | Path,
    output: str | Path,
    *,
    dtype: str = "fp32",
    overwrite: bool = False,
    verify: bool = False,
    tolerance: float | None = None,
    quantize: QuantizeOptions | None = None,
    fusions: bool = True,
    source_format: str = "hf",
    on_stage: Callable[[str], None] | None = None,
) -> ConvertResult:
    """Export ``source`` to ``output`` with one com.microsoft.MoE node per MoE layer.

    ``source_format`` is "hf" (a Hugging Face directory) or "fairseq" (an MoE checkpoint as fairseq
    writes it: ``<name>-shared.pt`` and ``<name>-rank-N.pt``).
    ``fusions`` fuses attention, RMSNorm and rotary subgraphs into ONNX Runtime's contrib ops.
    With ``quantize``, the experts (and optionally dense weights) are quantized before saving.
    Nothing is written to ``output`` unless every stage (and --verify, when asked) succeeds.
    """
    if dtype not in DTYPES:
        raise MoerunError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    source, output = Path(source), Path(output)
    check_output(output, overwrite)  # fail before minutes of work, not after
    # Validate everything cheap before the first stage is announced: bad input fails in one line.
    checkpoint = open_checkpoint(source, source_format)
    config = checkpoint.config
    adapter = adapter_for(config)
    if quantize is not None:
        hidden, inter = adapter.expert_dims(config)
        try:
            quantize.spec.check(2 * inter, hidden, "fc1")
            quantize.spec.check(hidden, inter, "fc2")
        except ValueError as e:
            raise MoerunError(f"cannot quantize this model's experts: {e}") from None
    stage = _Stages(on_stage)
    stage("load model")
    seq2seq = getattr(adapter, "seq2seq", False)
    # Encoder-decoders are exported in fp32 and converted by ONNX Runtime's float16 converter: their
    # PyTorch code has data-dependent fp16-only branches (inf clamping) that torch.export cannot trace.
    fp16_after = seq2seq and dtype == "fp16"
    model = checkpoint.load_model("fp32" if fp16_after else dtype, adapter.attn_implementation)
    eos, pad, bos = _special_tokens(model)
    # One GroupQueryAttention per layer where the family and this model's shape allow it.
    fused_attention = fusions and adapter.fused_attention and not seq2seq
    if fused_attention and (reason := unfusable_reason(model)):
        log.info("attention stays traced: %s", reason)
        fused_attention = False
    pad_for_verify = pad if pad is not None else (eos[0] if eos else 0)
    ref = None
    if verify:
        stage("reference outputs (PyTorch)")
        adapter.prepare_reference(model)
        if seq2seq:
            ref = verify_mod.reference_seq2seq(model, eos, pad_for_verify, _decoder_start(model))
        else:
            ref = verify_mod.reference(model, eos, pad_for_verify, right_padded=fused_attention)
    stage("fuse MoE blocks")
    swapped = adapter.swap_moe_blocks(model)
    stage("export ONNX")
    kv = adapter.kv_shape(config)
    if seq2seq:
        num_layers = adapter.decoder_layers(config)
        encoder, decoder = export_seq2seq(model, kv, adapter.cross_attention(model), num_layers)
        encoder_moe = sum(".encoder." in f".{name}." for name in swapped)
        graphs = {"encoder.onnx": (encoder, encoder_moe), "decoder.onnx": (decoder, len(swapped) - encoder_moe)}
        inputs, outputs = seq2seq_io_names(num_layers)["decoder"]
    else:
        num_layers = config.num_hidden_layers
        graphs = {"model.onnx": (export_decoder(model, kv, fused_attention), len(swapped))}
        inputs, outputs = decoder_io_names(num_layers, positions=not fused_attention)
    stage("graph passes")
    fusion_counts: dict[str, int] = {}
    for name, (onnx_model, expected) in graphs.items():
        passes = ([OrtFusions()] if fusions else []) + ([ToFloat16()] if fp16_after else [])
        passes += [PinIrVersion(), CheckFusedMoE(expected)]
        for p in passes:
            onnx_model = p(onnx_model).model
        graphs[name] = onnx_model
        for fusion, n in (passes[0].counts if fusions else {}).items():
            fusion_counts[fusion] = fusion_counts.get(fusion, 0) + n
    decoder_start = _decoder_start(model)
    del model

    from .. import __version__

    manifest = Manifest(
        architecture=adapter.architectures[0],
        model_type=config.model_type,
        kind="seq2seq" if seq2seq else "decoder",
        model_file="decoder.onnx" if seq2seq else "model.onnx",
        encoder_file="encoder.onnx" if seq2seq else None,
        encoder_moe_layers=encoder_moe if seq2seq else 0,
        decoder_start_token_id=decoder_start if seq2seq else None,
        num_layers=num_layers,
        num_kv_heads=kv.heads,
        head_dim=kv.key_dim,
        value_head_dim=kv.value_dim,
        vocab_size=config.vocab_size,
        hidden_size=getattr(config, "hidden_size", None) or config.d_model,
        num_experts=adapter.num_experts(config),
        experts_per_token=adapter.experts_per_token(config),
        moe_layers=len(swapped),
        dtype=dtype,
        attention="gqa" if fused_attention else "traced",
        inputs=inputs,
        outputs=outputs,
        passes=[type(p).__name__ for p in passes],
        fusions=fusion_counts,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=bos,
        source=str(source.resolve()),
        moerun_version=__version__,
    )
    if quantize is not None:
        stage(f"quantize ({quantize.label})")
        graphs, _ = apply_quantization(graphs, manifest, quantize)
    with staged_directory(output, overwrite) as staging:
        stage("save")
        files = [f for name, g in graphs.items() for f in save_model(g, staging, name)]
        files += copy_side_files(source if source.is_dir() else source.parent, staging)
        if not (staging / "config.json").is_file():  # fairseq: the Hugging Face config it was mapped to
            config.to_json_file(staging / "config.json")
            files.append("config.json")
        report = None
        if ref is not None:
            manifest.save(staging)
            stage("verify (ONNX Runtime)")
            tol = tolerance
            if tol is None and quantize is None:  # a quantized model is reported on, not held to fp tolerance
                tol = verify_mod.DEFAULT_TOLERANCE[dtype]
            compare = verify_mod.compare_seq2seq if seq2seq else verify_mod.compare
            report = compare(MoEModel.load(staging, provider="cpu"), ref, tol)
            manifest.verify = report.to_dict()
            verify_mod.check(report)
        manifest.save(staging)
        files.append("moerun.json")
        onnx_bytes = sum((staging / f).stat().st_size for f in files if ".onnx" in f)
    return ConvertResult(output, manifest, files, checkpoint.num_bytes, onnx_bytes, stage.finish(), report)
