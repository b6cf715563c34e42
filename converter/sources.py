"""Read a checkpoint: validate it, read its config, and map its tensors lazily (nothing is loaded here).

Hugging Face directories hold safetensors (single or sharded with an index), in fp32, fp16 or bf16,
or in the quantized formats real MoE releases ship:
- MXFP4 expert weights (GPT-OSS): ``*_blocks`` (uint8, two FP4 E2M1 values a byte) and ``*_scales``
  (E8M0 exponents, one per 32 values), the OCP Microscaling format; dequantized to bf16 on read with
  transformers' own ``convert_moe_packed_tensors``.
- FP8 E4M3 weights with block scales (DeepSeek-V3): ``weight`` and ``weight_scale_inv`` (one fp32
  scale per 128x128 block, ``quantization_config.weight_block_size``); dequantized to fp32 on read.
Either way the rest of the converter sees an ordinary tensor under the dequantized name.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..runtime.errors import CheckpointError

__all__ = ["FORMATS", "Checkpoint", "SafetensorsTensors", "open_checkpoint"]

FORMATS = ("hf", "fairseq")

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class _Deferred:
    """A tensor computed when indexed (``t[...]``), as transformers' loader reads safetensors slices."""

    def __init__(self, compute: Callable[[], torch.Tensor]) -> None:
        self.compute = compute

    def __getitem__(self, index) -> torch.Tensor:
        return self.compute()[index]


def _fp8_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """FP8 weight (out, in) times its per-block scale (ceil(out/b0), ceil(in/b1)), as DeepSeek-V3's
    ``weight_dequant`` computes it, kept in fp32 (the products do not fit bf16's 8 bits)."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


def _mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)


class SafetensorsTensors(Mapping):
    """Checkpoint key -> tensor, memory-mapped from the safetensors shards and read only when indexed.

    MXFP4 (``*_blocks``/``*_scales``) and FP8 (``weight`` + ``weight_scale_inv``) pairs appear as one
    bf16 tensor under the dequantized name; ``formats`` lists the quantized formats found.
    """

    def __init__(self, files: list[Path], fp8_block: tuple[int, int] = (128, 128)) -> None:
        # pread, not mmap: read tensors land in memory that is freed with them; mapped pages of a 14 GB
        # checkpoint would stay in this process's resident set as the stream passes over them
        self._files = [safe_open(f, framework="pt", backend="pread") for f in files]
        where = {key: handle for handle in self._files for key in handle.keys()}
        self._items: dict[str, object] = {}
        self.formats: set[str] = set()
        dtypes: set[str] = set()
        for key, handle in where.items():
            if key.endswith("_blocks") and f"{key[:-7]}_scales" in where:
                base = key[:-7]
                self._items[base] = _Deferred(lambda k=key, b=base: _mxfp4_dequantize(
                    where[k].get_tensor(k), where[f"{b}_scales"].get_tensor(f"{b}_scales")))
                self.formats.add("mxfp4")
            elif key.endswith("_scales") and f"{key[:-7]}_blocks" in where:
                continue
            elif key.endswith("_scale_inv") and key[:-10] in where:
                continue
            elif f"{key}_scale_inv" in where:
                self._items[key] = _Deferred(lambda k=key: _fp8_dequantize(
                    where[k].get_tensor(k), where[f"{k}_scale_inv"].get_tensor(f"{k}_scale_inv"), fp8_block))
                self.formats.add("fp8")
                dtypes.add("F32")
            else:
                self._items[key] = handle.get_slice(key)
                dtypes.add(self._items[key].get_dtype())
        if "mxfp4" in self.formats:
            dtypes.add("BF16")  # FP4 values times powers of two are exact in bf16
        floats = {_FLOATS[d] for d in dtypes if d in _FLOATS}
        # The dtype weights are loaded in: the checkpoint's own when it has one, else fp32 (nothing is rounded).
        self.dtype = floats.pop() if len(floats) == 1 else torch.float32

    def __getitem__(self, key: str):
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class Checkpoint:
    """A validated checkpoint: its (Hugging Face) config and its tensors by Hugging Face key."""

    path: Path
    config: object
    tensors: Mapping
    dtype: torch.dtype  # what the weights are loaded in before the graph's dtype is applied
    num_bytes: int
    source_format: str = "hf"  # "hf", or the format it was mapped from ("fairseq")
    quantized: tuple[str, ...] = ()  # quantized formats dequantized on read: "mxfp4", "fp8"


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({_first_line(e)})") from e
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path}: shards listed in {INDEX_FILE} are missing: {', '.join(missing)}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}; moerun reads safetensors checkpoints")


def _fp8_block(config) -> tuple[int, int]:
    quant = getattr(config, "quantization_config", None) or {}
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    block = quant.get("weight_block_size") or (128, 128)
    return int(block[0]), int(block[1])


def _tensors(files: list[Path], config) -> SafetensorsTensors:
    """Open every shard's header (cheap: nothing but the header is read) so corruption fails early."""
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                st.keys()
        except Exception as e:  # safetensors raises its own SafetensorError, plus OSError
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({_first_line(e)})") from e
    return SafetensorsTensors(files, _fp8_block(config))


def _strip_quantization(config, formats: set[str]) -> None:
    """The converter loads dequantized weights into a plain model: the source's quantization config
    must not make transformers build quantized modules."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    elif formats:
        log.info("quantized tensors (%s) without a quantization_config", ", ".join(sorted(formats)))


def open_checkpoint(path: str | Path, source_format: str = "hf") -> Checkpoint:
    """Validate a checkpoint and read its config; its tensors are mapped, not loaded."""
    from transformers import AutoConfig

    path = Path(path)
    if source_format == "fairseq":
        from .fairseq import load_fairseq_checkpoint

        config, state_dict = load_fairseq_checkpoint(path)
        files = sorted(path.glob("*.pt")) if path.is_dir() else [path]
        floats = {t.dtype for t in state_dict.values() if t.is_floating_point()}
        dtype = floats.pop() if len(floats) == 1 else torch.float32
        return Checkpoint(path, config, state_dict, dtype, sum(f.stat().st_size for f in files), "fairseq")
    if source_format != "hf":
        raise CheckpointError(f"unknown checkpoint format {source_format!r}; choose one of {', '.join(FORMATS)}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json, not a Hugging Face checkpoint directory")
    try:
        json.loads(config_file.read_text())
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"{config_file}: unreadable config ({_first_line(e)})") from e
    files = _weight_files(path)
    tensors = _tensors(files, config)
    _strip_quantization(config, tensors.formats)
    num_bytes = sum(f.stat().st_size for f in files)
    return Checkpoint(path, config, tensors, tensors.dtype, num_bytes, "hf", tuple(sorted(tensors.formats)))

