"""Check that every MoE layer became exactly one fused node and no data-dependent control flow is left."""

from __future__ import annotations

import onnx_ir as ir

from ...runtime.errors import ExportError

__all__ = ["FORBIDDEN_OPS", "CheckFusedMoE", "count_ops", "recurrent_scans"]

FORBIDDEN_OPS = ("Loop", "If", "NonZero", "Scan")


def recurrent_scans(state_layers: dict[int, dict]) -> int:
    """Scan nodes a hybrid graph holds by design: one time scan per layer carrying a ``recurrent`` state (Gated
    DeltaNet, Mamba: converter/gated_deltanet.py); none elsewhere."""
    return sum("recurrent" in states for states in state_layers.values())


def count_ops(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


class CheckFusedMoE(ir.passes.InPlacePass):
    """A postcondition pass: raises ExportError unless there are ``expected`` MoE/QMoE nodes and no loops, but for
    exactly ``scans`` Scan nodes (the time scans of recurrent layers, ``recurrent_scans``)."""

    def __init__(self, expected: int, scans: int = 0) -> None:
        super().__init__()
        self.expected = expected
        self.scans = scans

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        counts = count_ops(model)
        fused = counts.get("MoE", 0) + counts.get("QMoE", 0)
        if fused != self.expected:
            raise ExportError(f"expected {self.expected} fused MoE nodes, the graph has {fused}")
        if counts.get("Scan", 0) != self.scans:
            raise ExportError(f"expected {self.scans} Scan nodes (one per recurrent layer), the graph has "
                              f"{counts.get('Scan', 0)}: the MoE blocks were not fused")
        bad = {op: counts[op] for op in FORBIDDEN_OPS if op in counts and op != "Scan"}
        if bad:
            raise ExportError(f"the exported graph still has data-dependent ops {bad}: the MoE blocks were not fused")
        return ir.passes.PassResult(model, modified=False)
