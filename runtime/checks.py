"""Checks at the runtime's boundary: a model directory's graphs against its manifest, and each request against
the model, so that what would fail later inside ONNX Runtime (or silently wrap) is a one-line moerun error."""

from __future__ import annotations

import math
import reprlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import ModelDirError, RequestError
from .manifest import Manifest

__all__ = ["check_count", "check_fits", "check_graph", "check_ids", "check_prompts", "check_texts", "is_integer",
           "is_number"]

_FIX = "re-convert the checkpoint or fix moerun.json"


def check_graph(session, path: Path, inputs: list[str], outputs: list[str], manifest: Manifest,
                past: Sequence[str] = ()) -> None:
    """The ONNX graph at ``path`` has the inputs and outputs the manifest implies (num_layers, attention), and its
    ``past`` inputs the manifest's dtype, num_kv_heads and head dims."""
    graph_inputs = {i.name: i for i in session.get_inputs()}
    graph_outputs = [o.name for o in session.get_outputs()]
    if set(graph_inputs) != set(inputs) or set(graph_outputs) != set(outputs):
        layers = sum(n.startswith("present") for n in graph_outputs) // 2
        if layers != manifest.num_layers:
            raise ModelDirError(f"{path}: the graph has {layers} layers, moerun.json says num_layers "
                                f"{manifest.num_layers}; {_FIX}")
        missing = [n for n in inputs + outputs if n not in graph_inputs and n not in graph_outputs][:3]
        extra = [n for n in [*graph_inputs, *graph_outputs] if n not in inputs and n not in outputs][:3]
        raise ModelDirError(f"{path}: the graph does not match moerun.json (attention {manifest.attention!r}): "
                            f"missing {missing}, unexpected {extra}; {_FIX}")
    kv_type = "tensor(float16)" if manifest.dtype == "fp16" else "tensor(float)"
    for name, shape in zip(past, manifest.past_shapes(1)):
        arg = graph_inputs[name]
        if arg.type != kv_type:
            raise ModelDirError(f"{path}: {name} is {arg.type}, but moerun.json says dtype {manifest.dtype!r} "
                                f"({kv_type}); {_FIX}")
        dims = [d if isinstance(d, int) else None for d in arg.shape]
        if name.startswith("past."):  # a hybrid layer's fixed-size state: (batch, *its shape in moerun.json)
            if len(dims) != len(shape) or any(d not in (None, s) for d, s in zip(dims[1:], shape[1:])):
                raise ModelDirError(f"{path}: {name} has shape {arg.shape}, but moerun.json says {list(shape[1:])} "
                                    f"after the batch; {_FIX}")
            continue
        if len(dims) != 4 or dims[1] not in (None, shape[1]) or dims[3] not in (None, shape[3]):
            raise ModelDirError(f"{path}: {name} has shape {arg.shape}, but moerun.json says num_kv_heads "
                                f"{manifest.num_kv_heads} and head_dim {shape[3]}; {_FIX}")


def is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_count(value, name: str, minimum: int = 1) -> None:
    if not is_integer(value) or value < minimum:
        raise RequestError(f"{name} must be an integer >= {minimum}, got {value!r}")


def is_number(value) -> bool:
    """A finite real number, not a bool."""
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    return real and math.isfinite(value)


def check_ids(ids, what: str, vocab_size: int, ndim: int = 1) -> np.ndarray:
    """``ids`` as an int64 array of ``ndim`` dimensions, every id in [0, vocab_size)."""
    try:
        array = None if isinstance(ids, (str, bytes)) else np.asarray(ids)
    except ValueError:  # ragged nesting
        array = None
    if array is None or array.ndim != ndim or (array.size and not np.issubdtype(array.dtype, np.integer)):
        shape = "a list of" if ndim == 1 else f"a {ndim}-D array of"
        raise RequestError(f"{what} must be {shape} integer token ids, got {reprlib.repr(ids)}")
    array = array.astype(np.int64)
    bad = array[(array < 0) | (array >= vocab_size)]
    if bad.size:
        raise RequestError(f"{what}: token id {bad[0]} is outside this model's vocabulary of {vocab_size} "
                           f"(0..{vocab_size - 1}); check that the ids come from this model's tokenizer")
    return array


def check_prompts(prompts, vocab_size: int, what: str = "prompt") -> list[list[int]]:
    """A non-empty list of non-empty token id lists, every id in [0, vocab_size)."""
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
        raise RequestError(f"{what}s must be a list of token id lists, got {reprlib.repr(prompts)}")
    if len(prompts) == 0:
        raise RequestError(f"the {what} list is empty: pass at least one {what}")
    out = []
    for i, prompt in enumerate(prompts):
        ids = check_ids(prompt, f"{what} {i}", vocab_size)
        if ids.size == 0:
            raise RequestError(f"{what} {i} is empty: every {what} needs at least one token")
        out.append(ids.tolist())
    return out


def check_texts(texts, what: str = "prompt") -> None:
    """A non-empty list of str that tokenizers can read (valid Unicode: no lone surrogates from undecodable bytes)."""
    if len(texts) == 0:
        raise RequestError(f"the {what} list is empty: pass at least one {what}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(f"{what} {i} must be a str, got {type(text).__name__}; pass token ids to the *_ids "
                               "methods instead")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RequestError(f"{what} {i} is not valid UTF-8 text ({e.reason} at character {e.start}); decode "
                               "the input as UTF-8 first") from None


def check_fits(lengths: list[int], new_tokens: int, max_positions: int | None, what: str = "prompt") -> None:
    """Every prompt, and every prompt with its new tokens, fits the model's positions."""
    if max_positions is None:
        return
    for i, n in enumerate(lengths):
        if n > max_positions:
            raise RequestError(f"{what} {i} has {n} tokens, more than this model's {max_positions} positions; "
                               "shorten it")
        if n + new_tokens > max_positions:
            raise RequestError(f"{what} {i} ({n} tokens) + max_new_tokens {new_tokens} is more than this model's "
                               f"{max_positions} positions; lower max_new_tokens to {max_positions - n} or shorten "
                               f"the {what}")
