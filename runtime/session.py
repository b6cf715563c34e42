"""Create an ONNX Runtime session on the best execution provider that is actually usable."""

from __future__ import annotations

import ctypes
import logging
import os
from functools import cache

import onnxruntime as ort

from ..custom_ops import register_schemas  # noqa: F401  (no torch: schemas and reference only)
from .errors import MoerunError

__all__ = ["PROVIDERS", "cuda_usable", "create_session", "resolve_provider"]

log = logging.getLogger(__name__)

PROVIDERS = ("auto", "cuda", "cpu")
_EP = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


@cache
def cuda_usable() -> bool:
    """True when the CUDA driver loads and reports at least one device.

    onnxruntime-gpu lists CUDAExecutionProvider as available even on a machine with no GPU, and
    asking for it there prints warnings and falls back; so ask the driver directly, quietly.
    """
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return False
    return count.value > 0


def resolve_provider(provider: str) -> str:
    """'auto' -> 'cuda' when a CUDA device is usable, else 'cpu'; 'cuda' without one is an error."""
    if provider not in PROVIDERS:
        raise MoerunError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if provider == "auto":
        return "cuda" if cuda_usable() else "cpu"
    if provider == "cuda" and not cuda_usable():
        raise MoerunError("provider 'cuda' asked for, but no usable CUDA device or CUDA execution provider here")
    return provider


def create_session(model_path: str, provider: str = "auto", threads: int | None = None) -> ort.InferenceSession:
    """An InferenceSession on the resolved provider; raises if ONNX Runtime silently fell back."""
    chosen = resolve_provider(provider)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if chosen == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA/cuDNN libraries installed from PyPI (the [cuda] extra)
    providers = [_EP[chosen]] + ([_EP["cpu"]] if chosen == "cuda" else [])
    try:
        session = ort.InferenceSession(os.fspath(model_path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        raise MoerunError(f"{model_path}: ONNX Runtime cannot load it: {str(e).splitlines()[0]}") from e
    if _EP[chosen] not in session.get_providers():
        raise MoerunError(
            f"ONNX Runtime could not start {_EP[chosen]} (missing CUDA libraries? pip install 'moerun[cuda]')"
        )
    log.info("session on %s", session.get_providers()[0])
    return session
