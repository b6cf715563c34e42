"""Rewrite every com.microsoft.MoE node into QMoE with int4/int8 expert weights in ONNX Runtime's layout."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from ...custom_ops.quantize import QuantSpec, dequantize, quantize
from ...custom_ops.schemas import DOMAIN
from ...runtime.errors import MoerunError

__all__ = ["QuantizeExperts"]

log = logging.getLogger(__name__)

# MoE inputs: input, router_probs, fc1, fc1_bias, fc2, fc2_bias, fc3, fc3_bias
_FC1, _FC1_BIAS, _FC2, _FC2_BIAS, _FC3 = 2, 3, 4, 5, 6


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _const(node: ir.Node, index: int, what: str) -> np.ndarray:
    value = _input(node, index)
    if value is None or value.const_value is None:
        raise MoerunError(f"{node.name}: {what} is not a constant initializer; cannot quantize it")
    return value.const_value.numpy()


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _rel_rmse(original: np.ndarray, approx: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(approx - original)) / max(np.mean(np.square(original)), 1e-30)))


class QuantizeExperts(ir.passes.InPlacePass):
    """MoE -> QMoE; ``self.layers`` afterwards holds each layer's relative RMS weight error."""

    def __init__(self, spec: QuantSpec, accuracy_level: int | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.accuracy_level = accuracy_level
        self.layers: list[dict] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        moe_nodes = [n for n in graph if n.op_type == "MoE" and n.domain == DOMAIN]
        if not moe_nodes:
            if any(n.op_type == "QMoE" for n in graph):
                raise MoerunError("the model's experts are already quantized (QMoE); quantize the fp32/fp16 export")
            raise MoerunError("the model has no com.microsoft.MoE node to quantize")
        for index, node in enumerate(moe_nodes):
            self._rewrite(graph, node, index)
        common_passes.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=True)

    def _rewrite(self, graph: ir.Graph, node: ir.Node, index: int) -> None:
        if _input(node, _FC3) is not None:
            raise MoerunError(f"{node.name}: separate fc3 expert weights are not supported by the quantizer")
        spec, prefix = self.spec, f"moe{index}"
        record = {"node": node.name}
        packed = []
        for fc, what in ((_FC1, "fc1"), (_FC2, "fc2")):
            weight = _const(node, fc, f"{what} weights")
            try:
                q = quantize(weight.astype(np.float32), spec)
            except ValueError as e:
                raise MoerunError(f"cannot quantize {node.name} {what} {weight.shape}: {e}") from None
            record[f"{what}_rel_rmse"] = _rel_rmse(weight.astype(np.float32), dequantize(q, spec))
            scales = q.scales.astype(weight.dtype)  # scales in the activations' precision
            packed.append((
                _initializer(graph, f"{prefix}.{what}.qweight", q.packed),
                _initializer(graph, f"{prefix}.{what}.scales", scales),
                None if q.zero_points is None else _initializer(graph, f"{prefix}.{what}.zero_points", q.zero_points),
            ))
        (w1, s1, z1), (w2, s2, z2) = packed
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        attributes.update(expert_weight_bits=spec.bits, weights_prepacked=0)
        if spec.block_size:
            attributes["block_size"] = spec.block_size
        if self.accuracy_level:
            attributes["accuracy_level"] = self.accuracy_level
        inputs = [node.inputs[0], node.inputs[1], w1, s1, _input(node, _FC1_BIAS), w2, s2, _input(node, _FC2_BIAS),
                  None, None, None]
        if z1 is not None:
            inputs += [z1, z2]
        new = ir.node("QMoE", inputs, attributes, domain=DOMAIN, name=f"{node.name or prefix}_q{spec.bits}")
        new.outputs[0].shape, new.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]])
        self.layers.append(record)
        log.info("%s: fc1 rel rmse %.4f, fc2 %.4f", node.name, record["fc1_rel_rmse"], record["fc2_rel_rmse"])
