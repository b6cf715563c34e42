"""Create an ONNX Runtime session on the best execution provider that is actually usable."""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from .errors import InferenceError, MoerunError, PlacementError
from .manifest import Manifest
from .placement import RECORD_PLACEMENT, compute_fallbacks, describe_fallbacks, node_placement, ops_without_cuda_kernel

__all__ = ["PROVIDERS", "check_placement", "choose_provider", "cuda_usable", "create_session", "onnxruntime_errors",
           "resolve_provider"]

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


def choose_provider(requested: str, manifest: Manifest, cuda_available: bool | None = None) -> tuple[str, str | None]:
    """(provider, warning or None) for this model: resolve_provider, and what its manifest says about CUDA.

    fp16 is moerun's CUDA export. An fp32 graph whose GroupQueryAttention or QMoE nodes have no fp32 CUDA kernel
    would run them on the CPU EP: 'cuda' refuses it (PlacementError), 'auto' picks the CPU. Other fp32 graphs run
    on CUDA, with a warning when 'cuda' was asked for. The CUDA side is untested by moerun's test suite.
    """
    if requested not in PROVIDERS:
        raise MoerunError(f"unknown provider {requested!r}; choose one of {', '.join(PROVIDERS)}")
    available = cuda_usable() if cuda_available is None else cuda_available
    if requested == "cpu" or (requested == "auto" and not available):
        return "cpu", None
    if not available:
        raise MoerunError("provider 'cuda' asked for, but no usable CUDA device or CUDA execution provider here")
    if ops := ops_without_cuda_kernel(manifest):
        reason = (f"this {manifest.dtype} model's {' and '.join(ops)} nodes have CUDA kernels for fp16/bf16 only "
                  "and would run on the CPU execution provider")
        if requested == "cuda":
            raise PlacementError(f"provider 'cuda': {reason}; convert the checkpoint with --dtype fp16 (the CUDA "
                                 "export), or use provider 'cpu'")
        log.info("provider auto: CPU, because %s", reason)
        return "cpu", None
    if manifest.dtype == "fp32":
        warning = ("an fp32 model on CUDA: fp16 is moerun's CUDA export (convert with --dtype fp16); fp32 on CUDA is "
                   "slower and untested")
        if requested == "cuda":
            return "cuda", warning
        log.info("provider auto: %s", warning)
    return "cuda", None


def check_placement(session: ort.InferenceSession, model_path: str, provider: str) -> None:
    """Raises PlacementError when ONNX Runtime put compute nodes on another EP than ``provider``'s (the CPU EP in a
    CUDA session); shape nodes that it keeps on the CPU on purpose are logged. Needs a session created with
    RECORD_PLACEMENT; with an ONNX Runtime that cannot report placement, logs a warning."""
    placement = node_placement(session)
    if placement is None:
        log.warning("%s: this ONNX Runtime (%s) does not report where it placed the nodes; cannot check that none "
                    "fell back to the CPU", model_path, ort.__version__)
        return
    ep = _EP[provider]
    elsewhere = [op for where, op, _ in placement if where != ep]
    if elsewhere:
        log.info("%s: %d of %d nodes not on %s (%s)", model_path, len(elsewhere), len(placement), ep,
                 ", ".join(sorted(set(elsewhere))))
    if fallbacks := compute_fallbacks(placement, ep):
        raise PlacementError(
            f"{model_path}: ONNX Runtime placed {len(fallbacks)} compute nodes outside {ep} "
            f"({describe_fallbacks(fallbacks)}); they would run on the CPU. Convert with --dtype fp16 (the CUDA "
            "export), or use provider 'cpu'"
        )


def create_session(model_path: str, provider: str = "auto", threads: int | None = None) -> ort.InferenceSession:
    """An InferenceSession on the resolved provider; raises if ONNX Runtime silently fell back, as a whole or (on
    CUDA) node by node."""
    chosen = resolve_provider(provider)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failure raises (and becomes a one-line moerun error): no log line as well
    if threads:
        options.intra_op_num_threads = threads
    if chosen != "cpu":
        options.add_session_config_entry(RECORD_PLACEMENT, "1")
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
    if chosen != "cpu":
        check_placement(session, os.fspath(model_path), chosen)
    log.info("session on %s", session.get_providers()[0])
    return session


# Fail, InvalidArgument, RuntimeException, ...: ONNX Runtime's exception types, none of them a MoerunError.
_ORT_ERRORS = tuple(v for v in vars(_ort_state).values() if isinstance(v, type) and issubclass(v, Exception))


@contextmanager
def onnxruntime_errors(what: str) -> Iterator[None]:
    """Turns ONNX Runtime's exceptions raised while running ``what`` into one-line InferenceErrors."""
    try:
        yield
    except _ORT_ERRORS as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InferenceError(f"ONNX Runtime failed running {what}: {reason}; check the inputs' shapes and ids, "
                             "or re-convert the model") from e
