"""Tensors computed when the model is written: a shared one-shot result and the initializers that read it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = ["SharedResult", "lazy_tensor"]


class SharedResult:
    """A computation whose parts become several initializers (packed weights, scales, zero points): computed
    on first use, dropped once each of its ``readers`` has read its part, so one layer's result is in memory
    at a time while the model is written."""

    def __init__(self, compute: Callable[[], Any], readers: int) -> None:
        self.compute, self.readers = compute, readers
        self._result = None
        self._pending = 0

    def part(self, key):
        if self._result is None:
            self._result = self.compute()
            self._pending = self.readers
        part = self._result[key]
        self._pending -= 1
        if self._pending == 0:
            self._result = None
        return part


def lazy_tensor(graph: ir.Graph, name: str, dtype: ir.DataType, shape: tuple,
                compute: Callable[[], np.ndarray]) -> ir.Value:
    """A new initializer of ``graph`` whose value ``compute`` gives when the model is written (cast to ``dtype``)."""
    tensor = ir.LazyTensor(lambda: ir.tensor(np.asarray(compute()).astype(dtype.numpy(), copy=False), name=name),
                           dtype=dtype, shape=ir.Shape(shape), name=name)
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(dtype), const_value=tensor)
    graph.register_initializer(value)
    return value
