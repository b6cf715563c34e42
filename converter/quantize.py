"""Quantize an exported moerun model: experts to QMoE int4/int8, optionally dense MatMuls and fp16."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx_ir as ir

from ..custom_ops.quantize import METHODS, QuantSpec
from ..runtime import Manifest
from ..runtime.errors import ModelDirError, MoerunError
from .output import check_output, copy_side_files, save_model, staged_directory
from .passes import CheckFusedMoE, PinIrVersion, QuantizeDense, QuantizeExperts, ToFloat16
from .passes.check_fused import recurrent_scans

__all__ = ["BLOCK_SIZES", "DENSE", "QuantizeOptions", "QuantizeResult", "quantize_model", "quantize_passes"]

log = logging.getLogger(__name__)

BLOCK_SIZES = (0, 16, 32, 64, 128)
DENSE = ("none", "int8", "int4")
SCHEMES = ("symmetric", "asymmetric")


@dataclass(frozen=True)
class QuantizeOptions:
    """What `moerun quantize` (and `convert --quantize`) does; defaults chosen by measurement (README)."""

    bits: int = 4
    block_size: int = 64  # block-wise: per-row scales take a slow dequantizing path on CPU
    scheme: str = "symmetric"
    method: str = "mse"
    dense: str = "none"
    fp16: bool = False
    # 4: int8 activations in the CPU kernel. Measured: int4 decode 2x faster on the GPT-OSS anchor, and
    # on the trained fixture +0.11% perplexity vs +0.13% without it (README). CUDA ignores it.
    accuracy_level: int | None = 4

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise MoerunError(f"--bits must be 4 or 8 (QMoE has no int{self.bits} kernel), got {self.bits}")
        if self.block_size not in BLOCK_SIZES:
            raise MoerunError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block_size}")
        if self.scheme not in SCHEMES:
            raise MoerunError(f"--scheme must be symmetric or asymmetric, got {self.scheme!r}")
        if self.method not in METHODS:
            raise MoerunError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.dense not in DENSE:
            raise MoerunError(f"--dense must be one of {', '.join(DENSE)}, got {self.dense!r}")
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise MoerunError(f"--accuracy-level must be 0-4, got {self.accuracy_level}")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.block_size, self.scheme == "symmetric", self.method)

    @property
    def label(self) -> str:
        """A short name: int4-b64-mse, int8-b0-rtn-asym, ... (+dense, +fp16, +acc4)."""
        parts = [f"int{self.bits}", f"b{self.block_size}", self.method]
        parts += ["asym"] if self.scheme == "asymmetric" else []
        parts += [f"dense-{self.dense}"] if self.dense != "none" else []
        parts += ["fp16"] if self.fp16 else []
        parts += [f"acc{self.accuracy_level}"] if self.accuracy_level else []
        return "-".join(parts)


@dataclass
class QuantizeResult:
    output: Path
    manifest: Manifest
    source_bytes: int
    onnx_bytes: int
    layers: list[dict] = field(default_factory=list)


def quantize_passes(options: QuantizeOptions, moe_layers: int, fp16_pass: bool = True,
                    layers: list[dict] | None = None, scans: int = 0) -> list[ir.passes.PassBase]:
    """The passes of ``options``; ``fp16_pass`` False: the graph was already traced in fp16. ``layers``
    collects each MoE layer's weight error as the experts are quantized. ``scans``: the recurrent layers' Scan
    nodes the graph holds by design."""
    passes: list[ir.passes.PassBase] = [QuantizeExperts(options.spec, options.accuracy_level, layers)]
    if options.dense != "none":
        passes.append(QuantizeDense(bits=8 if options.dense == "int8" else 4, block_size=32,
                                    accuracy_level=options.accuracy_level))
    if options.fp16 and fp16_pass:
        passes.append(ToFloat16())
    return passes + [PinIrVersion(), CheckFusedMoE(moe_layers, scans)]


def apply_quantization(graphs: dict[str, ir.Model], manifest: Manifest, options: QuantizeOptions,
                       fp16_pass: bool = True) -> tuple[dict[str, ir.Model], dict]:
    """Run the quantization passes on each graph (file name -> model; one for a decoder, encoder and
    decoder for seq2seq); returns them and the manifest's quantization record. Expert weights are
    quantized lazily: when the model is written, one layer at a time (the record's "layers" fill then)."""
    if manifest.quantization:
        raise MoerunError("this model is already quantized; quantize the fp32/fp16 export instead")
    expected = manifest.graphs()
    record = {**asdict(options), "label": options.label, "layers": []}
    out = {}
    for name, model in graphs.items():
        passes = quantize_passes(options, expected[name], fp16_pass, record["layers"],
                                 recurrent_scans(manifest.state_layers()))
        for p in passes:
            model = p(model).model
        out[name] = model
        for p in passes:
            if isinstance(p, QuantizeDense):
                record["dense_nodes"] = [*record.get("dense_nodes", []), *p.quantized]
            if isinstance(p, ToFloat16):
                record["fp16_kept_fp32_ops"] = sorted({*record.get("fp16_kept_fp32_ops", []), *p.kept_fp32})
    manifest.passes = [*manifest.passes, *(type(p).__name__ for p in passes)]
    if options.fp16:
        manifest.dtype = "fp16"
    manifest.quantization = record
    return out, record


def _graph_bytes(directory: Path, manifest: Manifest) -> int:
    return sum(p.stat().st_size for name in manifest.graphs() for p in directory.glob(f"{name}*"))


def quantize_model(source: str | Path, output: str | Path, options: QuantizeOptions, *, overwrite: bool = False,
                   on_stage: Callable[[str], None] | None = None) -> QuantizeResult:
    """Read a moerun model directory, quantize it, write a new one (atomically). Expert weights are read,
    quantized and written one layer at a time."""
    source, output = Path(source), Path(output)
    manifest = Manifest.load(source)
    if manifest.quantization:
        raise MoerunError(f"{source} is already quantized ({manifest.quantization.get('label')}); "
                          "quantize the fp32/fp16 export instead")
    missing = [f for name in manifest.graphs() for f in (name, f"{name}.data") if not (source / f).is_file()]
    if missing:
        raise ModelDirError(f"{source}: no {', '.join(missing)}, which moerun.json names; convert the model again")
    check_output(output, overwrite, source)
    with staged_directory(output, overwrite) as staging:
        if on_stage:
            on_stage("load ONNX model")
        graphs = {name: ir.load(source / name) for name in manifest.graphs()}
        if on_stage:
            on_stage(f"quantize ({options.label})")
        graphs, record = apply_quantization(graphs, manifest, options)
        if on_stage:
            on_stage("save")
        saved = {name: save_model(model, staging, name) for name, model in graphs.items()}
        copy_side_files(source, staging)
        # the source's verification was of the unquantized model: say this one was not verified
        manifest.verify = {"scope": "not verified after quantization (convert --quantize --verify verifies)"}
        manifest.weights = {name: {"tensors": len(s.sha256), "bytes": s.tensor_bytes, "sha256": s.sha256}
                            for name, s in saved.items()}
        manifest.save(staging)
        onnx_bytes = _graph_bytes(staging, manifest)
    source_bytes = _graph_bytes(source, manifest)
    return QuantizeResult(output, manifest, source_bytes, onnx_bytes, record["layers"])
