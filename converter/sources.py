"""Read a Hugging Face checkpoint directory: validate it, then load its config and model."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from ..runtime.errors import CheckpointError

__all__ = ["HFCheckpoint", "open_checkpoint"]

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
        from transformers import AutoModelForCausalLM

        torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
        try:
            model = AutoModelForCausalLM.from_pretrained(
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


def open_checkpoint(path: str | Path) -> HFCheckpoint:
    """Validate a Hugging Face checkpoint directory and read its config (no weights are loaded)."""
    from transformers import AutoConfig

    path = Path(path)
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
