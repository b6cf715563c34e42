"""Bind each weight initializer a skeleton trace left without a value to the checkpoint, lazily."""

from __future__ import annotations

import logging

import onnx_ir as ir

from ..weights import WeightStream

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
        for value in model.graph.initializers.values():
            if value.const_value is None:
                value.const_value = self.stream.lazy(self.graph_name, value)
                bound += 1
        log.info("%s: %d weights bound to the checkpoint", self.graph_name, bound)
        return ir.passes.PassResult(model, modified=bool(bound))
