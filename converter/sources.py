"""Read a Hugging Face checkpoint directory: validate it, then load its config and model."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from ..runtime.errors import CheckpointError

__all__ = ["FORMATS", "FairseqCheckpoint", "HFCheckpoint", "open_checkpoint"]

FORMATS = ("hf", "fairseq")

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass
class HFCheckpoint:
    """A validated Hugging Face model directory."""

    path: Path
    config: object
    weight_files: list[Path]

    @property
    def num_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)

    def load_model(self, dtype: str = "fp32", attn_implementation: str = "sdpa"):
        """The PyTorch model, weights memory-mapped from safetensors, eval mode."""
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
        auto = AutoModelForSeq2SeqLM if getattr(self.config, "is_encoder_decoder", False) else AutoModelForCausalLM
        try:
            model = auto.from_pretrained(
                self.path, config=self.config, dtype=torch_dtype, attn_implementation=attn_implementation
            )
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise CheckpointError(f"{self.path}: cannot load the weights: {_first_line(e)}") from e
        return model.eval()


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


def _check_safetensors(files: list[Path]) -> None:
    """Open each file's header (cheap: nothing is read but the header) so corruption fails early."""
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                st.keys()
        except Exception as e:  # safetensors raises its own SafetensorError, plus OSError
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({_first_line(e)})") from e


@dataclass
class FairseqCheckpoint:
    """A fairseq MoE checkpoint (shared + per-rank files), mapped onto Hugging Face NLLB-MoE."""

    path: Path
    config: object
    state_dict: dict
    num_bytes: int

    def load_model(self, dtype: str = "fp32", attn_implementation: str = "eager"):
        import torch
        from transformers import NllbMoeForConditionalGeneration

        self.config._attn_implementation = attn_implementation
        with torch.device("meta"):
            model = NllbMoeForConditionalGeneration(self.config)
        try:
            model.load_state_dict(self.state_dict, strict=False, assign=True)
        except RuntimeError as e:
            raise CheckpointError(f"{self.path}: the weights do not fit the model: {_first_line(e)}") from e
        model.tie_weights()
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise CheckpointError(f"{self.path}: no weights for {', '.join(missing[:3])}"
                                  f"{' and more' if len(missing) > 3 else ''}")
        for name, buffer in list(model.named_buffers()):  # sinusoidal positions are not in the checkpoint
            if buffer.is_meta:
                module_name, _, attr = name.rpartition(".")
                module = model.get_submodule(module_name)
                if not hasattr(module, "get_embedding"):
                    raise CheckpointError(f"{self.path}: no values for the buffer {name}")
                setattr(module, attr, module.get_embedding(module.num_positions + module.offset,
                                                           module.embedding_dim, module.padding_idx))
        torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
        return model.to(torch_dtype).eval()


def open_checkpoint(path: str | Path, source_format: str = "hf") -> HFCheckpoint | FairseqCheckpoint:
    """Validate a checkpoint and read its config (Hugging Face: no weights are loaded yet)."""
    from transformers import AutoConfig

    path = Path(path)
    if source_format == "fairseq":
        from .fairseq import load_fairseq_checkpoint

        config, state_dict = load_fairseq_checkpoint(path)
        files = sorted(path.glob("*.pt")) if path.is_dir() else [path]
        return FairseqCheckpoint(path, config, state_dict, sum(f.stat().st_size for f in files))
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
    _check_safetensors(files)
    return HFCheckpoint(path, config, files)
