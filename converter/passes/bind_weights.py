"""Bind each weight initializer a skeleton trace left without a value to the checkpoint, lazily."""

from __future__ import annotations

import logging

import onnx_ir as ir

from ..weights import WeightStream
from .fold_transposes import TRANSPOSED, transposed

__all__ = ["BindWeights"]

log = logging.getLogger(__name__)


class BindWeights(ir.passes.InPlacePass):
    """Initializers without a value get a LazyTensor computed by ``stream`` when the model is saved."""

    def __init__(self, stream: WeightStream, graph_name: str) -> None:
        super().__init__()
        self.stream = stream
        self.graph_name = graph_name

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        bound = 0
        sources = {}
        for value in model.graph.initializers.values():
            if value.const_value is None and TRANSPOSED in value.meta:  # W.T folded before W had a value
                source, perm = value.meta[TRANSPOSED]
                shape = [0] * len(perm)
                for i, p in enumerate(perm):
                    shape[p] = value.shape[i]
                if source not in sources:
                    sources[source] = self.stream.lazy(self.graph_name, source, value.dtype, ir.Shape(shape))
                value.const_value = transposed(sources[source], perm, value.name)
                bound += 1
            elif value.const_value is None:
                value.const_value = self.stream.lazy(self.graph_name, value.name, value.dtype, value.shape)
                bound += 1
        log.info("%s: %d weights bound to the checkpoint", self.graph_name, bound)
        return ir.passes.PassResult(model, modified=bool(bound))
