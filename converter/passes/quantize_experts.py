"""Rewrite every com.microsoft.MoE node into QMoE with int4/int8 expert weights in ONNX Runtime's layout."""

from __future__ import annotations

import logging

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from ...custom_ops.quantize import QuantSpec, quantize_with_error
from ...custom_ops.schemas import DOMAIN
from ...runtime.errors import MoerunError
from .lazy import SharedResult, lazy_tensor

__all__ = ["QuantizeExperts"]

log = logging.getLogger(__name__)

# MoE inputs: input, router_probs, fc1, fc1_bias, fc2, fc2_bias, fc3, fc3_bias
_FC1, _FC1_BIAS, _FC2, _FC2_BIAS, _FC3 = 2, 3, 4, 5, 6


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _weight(node: ir.Node, index: int, what: str) -> ir.Value:
    value = _input(node, index)
    if value is None or value.const_value is None or value.shape is None or len(value.shape) != 3:
        raise MoerunError(f"{node.name}: {what} is not a constant (E, N, K) initializer; cannot quantize it")
    return value


def _zero_point_shape(e: int, n: int, groups: int | None, bits: int) -> tuple:
    """Zero points are packed like the weights along their last axis (per row: along N)."""
    per_byte = 8 // bits
    return (e, n, groups // per_byte) if groups else (e, n // per_byte)


class QuantizeExperts(ir.passes.InPlacePass):
    """MoE -> QMoE, expert weights quantized lazily: per expert, when the model is written.

    ``self.layers`` holds one record per MoE node; each record's relative RMS weight errors
    (``fc1_rel_rmse``, ``fc2_rel_rmse``) are filled in as that layer is quantized.
    """

    def __init__(self, spec: QuantSpec, accuracy_level: int | None = None, layers: list[dict] | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.accuracy_level = accuracy_level
        self.layers: list[dict] = [] if layers is None else layers

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

    def _quantized_inputs(self, graph: ir.Graph, weight: ir.Value, record: dict, what: str) -> list:
        spec = self.spec
        e, n, k = (int(d) for d in weight.shape)
        try:
            spec.check(n, k, what)
        except ValueError as err:
            raise MoerunError(f"cannot quantize {record['node']} {what} {(e, n, k)}: {err}") from None
        groups = k // spec.block_size if spec.block_size else None
        source = weight.const_value

        def compute() -> dict:
            quantized, rel_rmse = quantize_with_error(source.numpy(), spec)
            record[f"{what}_rel_rmse"] = rel_rmse
            log.info("%s %s: rel rmse %.4f", record["node"], what, rel_rmse)
            return {"packed": quantized.packed, "scales": quantized.scales, "zero_points": quantized.zero_points}

        q = SharedResult(compute, readers=2 if spec.symmetric else 3)
        dtype, name = weight.dtype, weight.name  # named after the weight: its layer group is written with it
        inputs = [
            lazy_tensor(graph, f"{name}.qweight", ir.DataType.UINT8, (e, n, k * spec.bits // 8),
                        lambda: q.part("packed")),
            # scales in the activations' precision
            lazy_tensor(graph, f"{name}.scales", dtype, (e, n, groups) if groups else (e, n),
                        lambda: q.part("scales")),
        ]
        if not spec.symmetric:
            inputs.append(lazy_tensor(graph, f"{name}.zero_points", ir.DataType.UINT8,
                                      _zero_point_shape(e, n, groups, spec.bits), lambda: q.part("zero_points")))
        return inputs

    def _rewrite(self, graph: ir.Graph, node: ir.Node, index: int) -> None:
        if _input(node, _FC3) is not None:
            raise MoerunError(f"{node.name}: separate fc3 expert weights are not supported by the quantizer")
        record = {"node": node.name or f"moe{index}"}
        w1, s1, *z1 = self._quantized_inputs(graph, _weight(node, _FC1, "fc1 weights"), record, "fc1")
        w2, s2, *z2 = self._quantized_inputs(graph, _weight(node, _FC2, "fc2 weights"), record, "fc2")
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        attributes.update(expert_weight_bits=self.spec.bits, weights_prepacked=0)
        if self.spec.block_size:
            attributes["block_size"] = self.spec.block_size
        if self.accuracy_level:
            attributes["accuracy_level"] = self.accuracy_level
        inputs = [node.inputs[0], node.inputs[1], w1, s1, _input(node, _FC1_BIAS), w2, s2, _input(node, _FC2_BIAS),
                  None, None, None, *z1, *z2]
        new = ir.node("QMoE", inputs, attributes, domain=DOMAIN, name=f"{record['node']}_q{self.spec.bits}")
        new.outputs[0].shape, new.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]])
        self.layers.append(record)
