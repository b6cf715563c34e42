"""Write an output directory atomically: everything goes to a sibling temp dir, renamed into place on success."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir

from ..runtime.errors import OutputExistsError

__all__ = ["COPIED_FILES", "copy_side_files", "save_model", "staged_directory"]

# Files a serving host needs beside the graph: tokenizer, generation defaults, the model config.
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)

def check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} exists; pass --overwrite to replace it")


@contextlib.contextmanager
def staged_directory(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside ``output``; on success it replaces ``output``, on any error it is removed."""
    output = Path(output)
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        yield staging
        if output.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".old", dir=output.parent))
            os.replace(output, trash / "old")
            os.replace(staging, output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_model(model: ir.Model, directory: Path, name: str = "model.onnx") -> list[str]:
    """Save the graph, its tensors in ``NAME.data`` beside it: ONNX Runtime then maps the weights instead of
    parsing a protobuf copy of them (measured, int4 GPT-OSS anchor: session RSS 291 MB vs 387 MB inline),
    and no model hits protobuf's 2 GB cap."""
    ir.save(model, directory / name, external_data=f"{name}.data")
    return [name, f"{name}.data"]


def copy_side_files(source: Path, directory: Path) -> list[str]:
    copied = []
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, directory / name)
            copied.append(name)
    return copied
