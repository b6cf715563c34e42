"""Fold Transpose nodes on weight initializers into transposed initializers, computed when saved."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

__all__ = ["TRANSPOSED", "FoldWeightTransposes", "transposed"]

log = logging.getLogger(__name__)


def transposed(tensor: ir.TensorProtocol, perm: list[int], name: str) -> ir.LazyTensor:
    shape = ir.Shape([tensor.shape[i] for i in perm])
    return ir.LazyTensor(lambda: ir.tensor(np.ascontiguousarray(tensor.numpy().transpose(perm)), name=name),
                         dtype=tensor.dtype, shape=shape, name=name)


# On a folded initializer whose source had no value yet: (source name, perm), for BindWeights
TRANSPOSED = "moerun.transposed"


class FoldWeightTransposes(ir.passes.InPlacePass):
    """Transpose(W) with W an initializer -> one initializer W.T (a LazyTensor over W).

    torch exports nn.Linear as MatMul(x, Transpose(W)). onnxscript's constant folder folds those by
    computing the transposed weight in memory; a traced skeleton's weights have no value yet, so the
    folder leaves them and this pass folds them without reading anything (written by hand for that).
    It runs before the ORT fusions, which would otherwise absorb the Transpose into a FusedMatMul
    (transB), a form MatMulNBits quantization does not take. A weight without a value yet gives a
    W.T without one either, marked for BindWeights.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        folded = 0
        for node in list(graph):
            source = node.inputs[0] if node.op_type == "Transpose" and node.domain in ("", "ai.onnx") else None
            if source is None or not source.is_initializer() or source.shape is None:
                continue
            output = node.outputs[0]
            if output.is_graph_output():
                continue
            attr = node.attributes.get("perm")
            perm = list(attr.as_ints()) if attr is not None else list(reversed(range(len(source.shape))))
            name = f"{source.name}.T"
            shape = ir.Shape([source.shape[i] for i in perm])
            tensor = None if source.const_value is None else transposed(source.const_value, perm, name)
            value = ir.Value(name=name, shape=shape, type=source.type, const_value=tensor)
            if tensor is None:
                value.meta[TRANSPOSED] = (source.name, perm)
            graph.initializers[name] = value
            ir.convenience.replace_all_uses_with(output, value)
            graph.remove(node, safe=True)
            if not source.uses():
                del graph.initializers[source.name]
            folded += 1
        log.info("folded %d weight transposes", folded)
        return ir.passes.PassResult(model, modified=bool(folded))
