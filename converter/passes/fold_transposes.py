"""Fold Transpose nodes on weight initializers into transposed initializers, computed when saved."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

__all__ = ["FoldWeightTransposes"]

log = logging.getLogger(__name__)


def _transposed(tensor: ir.TensorProtocol, perm: list[int], name: str) -> ir.LazyTensor:
    shape = ir.Shape([tensor.shape[i] for i in perm])
    return ir.LazyTensor(lambda: ir.tensor(np.ascontiguousarray(tensor.numpy().transpose(perm)), name=name),
                         dtype=tensor.dtype, shape=shape, name=name)


class FoldWeightTransposes(ir.passes.InPlacePass):
    """Transpose(W) with W an initializer -> one initializer W.T (a LazyTensor over W).

    torch exports nn.Linear as MatMul(x, Transpose(W)). onnxscript's constant folder folds those by
    computing the transposed weight in memory; a traced skeleton's weights have no value yet, so the
    folder leaves them and this pass folds them without reading anything (written by hand for that).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        folded = 0
        for node in list(graph):
            source = node.inputs[0] if node.op_type == "Transpose" and node.domain in ("", "ai.onnx") else None
            if source is None or not source.is_initializer() or source.const_value is None:
                continue
            output = node.outputs[0]
            if output.is_graph_output():
                continue
            attr = node.attributes.get("perm")
            perm = list(attr.as_ints()) if attr is not None else list(reversed(range(len(source.shape))))
            name = f"{source.name}.T"
            tensor = _transposed(source.const_value, perm, name)
            value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
            graph.initializers[name] = value
            ir.convenience.replace_all_uses_with(output, value)
            graph.remove(node, safe=True)
            if not source.uses():
                del graph.initializers[source.name]
            folded += 1
        log.info("folded %d weight transposes", folded)
        return ir.passes.PassResult(model, modified=bool(folded))
