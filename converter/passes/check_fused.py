"""Check that every MoE layer became exactly one fused node and no data-dependent control flow is left."""

from __future__ import annotations

import onnx_ir as ir

from ...runtime.errors import ExportError

__all__ = ["FORBIDDEN_OPS", "CheckFusedMoE", "count_ops"]

FORBIDDEN_OPS = ("Loop", "If", "NonZero", "Scan")


def count_ops(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


class CheckFusedMoE(ir.passes.InPlacePass):
    """A postcondition pass: raises ExportError unless there are ``expected`` MoE/QMoE nodes and no loops."""

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.expected = expected

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        counts = count_ops(model)
        fused = counts.get("MoE", 0) + counts.get("QMoE", 0)
        if fused != self.expected:
            raise ExportError(f"expected {self.expected} fused MoE nodes, the graph has {fused}")
        bad = {op: counts[op] for op in FORBIDDEN_OPS if op in counts}
        if bad:
            raise ExportError(f"the exported graph still has data-dependent ops {bad}: the MoE blocks were not fused")
        return ir.passes.PassResult(model, modified=False)
