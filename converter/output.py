"""Write an output directory safely: checked before any work, staged in a sibling temp dir, renamed
into place on success, never left half-written (stale staging dirs of killed runs are removed)."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..runtime.errors import MoerunError, OutputExistsError
from ..runtime.memory import human_bytes
from .weights import order_by_group

__all__ = ["COPIED_FILES", "SavedGraph", "check_disk_space", "check_output", "copy_side_files", "human_bytes",
           "save_model", "staged_directory"]

log = logging.getLogger(__name__)

# Files a serving host needs beside the graph: tokenizer, generation defaults, the model config.
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "spiece.model",  # T5 / Switch Transformers' SentencePiece model (`moerun deploy tokenizer` needs it)
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
_OWNER = ".moerun-owner"  # in a staging dir: the pid of the process writing it
DATA_ALIGNMENT = 4096  # offset of every tensor over 1 MB in the external data file (onnx_ir's align_threshold)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except PermissionError:
        raise MoerunError(f"cannot access {path}: permission denied") from None


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not _exists(path):
        path = path.parent
    return path


def check_output(output: Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse, before any work, an output that exists (without ``overwrite``), that is or overlaps the
    source, or whose directory cannot be written."""
    output = Path(output)
    if _exists(output) and not overwrite:
        raise OutputExistsError(f"{output} exists; pass --overwrite to replace it")
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"{output} exists and is not a directory")
    if source is not None and _exists(Path(source)):
        out, src = output.resolve(), Path(source).resolve()
        src_dir = src if src.is_dir() else src.parent
        if out == src_dir or src_dir in out.parents or out in src_dir.parents:
            raise MoerunError(f"the output {output} would overwrite the checkpoint {source}: "
                              "choose a directory outside it")
    ancestor = _existing_ancestor(output.parent)
    if not ancestor.is_dir():
        raise MoerunError(f"cannot create {output}: {ancestor} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".moerun-probe.", dir=ancestor)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise MoerunError(f"cannot write to {ancestor}: {e.strerror or e}") from None


def check_disk_space(output: Path, needed: int) -> None:
    """Raise before anything is written when the output's file system has less than ``needed`` bytes free."""
    ancestor = _existing_ancestor(Path(output).parent)
    free = shutil.disk_usage(ancestor).free
    margin = 16 * 2**20 + needed // 100  # graph protobufs, manifest, tokenizer files
    if needed + margin > free:
        raise MoerunError(f"not enough disk space in {ancestor}: the model needs {human_bytes(needed + margin)}, "
                          f"{human_bytes(free)} is free")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(output: Path) -> None:
    """Staging dirs of this output left by a killed run (SIGKILL, out of memory): ours (owner file) and
    no longer owned by a live process."""
    for stale in output.parent.glob(f".{output.name}.*.partial"):
        try:
            pid = int((stale / _OWNER).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if not _alive(pid):
            log.info("removing %s, left by a run that did not finish (pid %d)", stale, pid)
            shutil.rmtree(stale, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_directory(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside ``output``; on success it replaces ``output``, on any error it is removed."""
    output = Path(output)
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(output)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        (staging / _OWNER).write_text(f"{os.getpid()}\n")
        yield staging
        (staging / _OWNER).unlink()
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it 0700: readable by a serving account
        if output.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".old", dir=output.parent))
            os.replace(output, trash / "old")
            os.replace(staging, output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass
class SavedGraph:
    """What save_model wrote: file names, bytes of tensors, and the sha256 of each tensor."""

    files: list[str]
    tensor_bytes: int = 0
    sha256: dict[str, str] = field(default_factory=dict)


def _hashed(tensor: ir.TensorProtocol, name: str, saved: SavedGraph,
            on_bytes: Callable[[int], None] | None) -> ir.LazyTensor:
    """``tensor`` as a LazyTensor that records the sha256 of its bytes when it is computed for writing."""

    def compute() -> ir.TensorProtocol:
        value = tensor._evaluate() if isinstance(tensor, ir.LazyTensor) else tensor
        array = np.ascontiguousarray(value.numpy())
        saved.sha256[name] = hashlib.sha256(memoryview(array).cast("B")).hexdigest()
        saved.tensor_bytes += array.nbytes
        if on_bytes:
            on_bytes(array.nbytes)
        return value

    return ir.LazyTensor(compute, dtype=tensor.dtype, shape=tensor.shape, name=name)


def save_model(model: ir.Model, directory: Path, name: str = "model.onnx",
               on_bytes: Callable[[int], None] | None = None) -> SavedGraph:
    """Save the graph, its tensors in ``NAME.data`` beside it, computing lazy tensors one layer group at a
    time in write order. External data: ONNX Runtime maps the weights instead of parsing a protobuf copy
    of them (measured, int4 GPT-OSS anchor: session RSS 291 MB vs 387 MB inline), and no model hits
    protobuf's 2 GB cap. ``on_bytes`` is called with each tensor's size as it is written."""
    order_by_group(model.graph)
    saved = SavedGraph([name, f"{name}.data"])
    originals = {}
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            originals[value.name] = value.const_value
            value.const_value = _hashed(value.const_value, value.name, saved, on_bytes)
    try:
        # tensors over 1 MB start on a 4 KiB boundary of the data file: ONNX Runtime maps them where they lie, and
        # the same graph decoded 5-11% slower with its weights 2 KiB off a page (docs/bench_decode_ab.md). onnx_ir
        # before 1.1 always aligned them (to 64 KiB) and has no such argument; 1.1 aligns only when asked.
        aligned = {"alignment": DATA_ALIGNMENT} if "alignment" in inspect.signature(ir.save).parameters else {}
        ir.save(model, directory / name, external_data=f"{name}.data", **aligned)
    finally:
        for value in model.graph.initializers.values():
            if value.name in originals:
                value.const_value = originals[value.name]
    return saved


def copy_side_files(source: Path, directory: Path) -> list[str]:
    copied = []
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, directory / name)
            copied.append(name)
    return copied
