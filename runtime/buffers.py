"""Buffers for IO binding: KV caches allocated on the session's device, logits written into host arrays."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

__all__ = ["bind_input", "bind_host_output", "device_buffer", "output_spec", "to_device"]

_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def device_buffer(shape: tuple[int, ...], dtype, device: str) -> ort.OrtValue:
    """A tensor of ``shape`` on ``device``. On the CPU it is zeroed (calloc: free until written). On CUDA it is
    allocated there, uninitialised, with no host array copied over: the graphs read a KV position only after
    writing it (GroupQueryAttention reads each row's first seqlens_k + 1 positions, as onnxruntime-genai's shared
    buffers assume). Untested on CUDA by the test suite; scripts/check_cuda.py runs with the buffers poisoned."""
    if device == "cpu":
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=dtype))
    return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, device, 0)


def to_device(array: np.ndarray, device: str) -> ort.OrtValue:
    """``array`` as an OrtValue on ``device`` (on the CPU the OrtValue shares the array's memory)."""
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, 0)


def output_spec(session: ort.InferenceSession, name: str, width: int) -> tuple[type, int]:
    """(NumPy dtype, last dimension) of the graph output ``name``; ``width`` when the graph leaves it symbolic."""
    output = next(o for o in session.get_outputs() if o.name == name)
    last = output.shape[-1] if output.shape else None
    return _NUMPY[output.type], last if isinstance(last, int) else width


def bind_host_output(binding: ort.IOBinding, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A new host array that ONNX Runtime writes output ``name`` into (from the device, on CUDA): no array of
    ONNX Runtime's own to copy or to keep alive."""
    out = np.empty(shape, dtype=dtype)
    binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(out))
    return out


def bind_input(binding: ort.IOBinding, name: str, value) -> None:
    """Binds an OrtValue where it lies (no copy) or a host array (copied to the device when the graph needs it)."""
    if isinstance(value, ort.OrtValue):
        binding.bind_ortvalue_input(name, value)
    else:
        binding.bind_cpu_input(name, np.ascontiguousarray(value))
