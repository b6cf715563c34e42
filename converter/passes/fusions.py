"""Fuse attention, RMSNorm and rotary subgraphs into ONNX Runtime's contrib ops (onnxscript's ORT fusions)."""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnxscript.rewriter.ort_fusions import optimize_for_ort

__all__ = ["OrtFusions"]

log = logging.getLogger(__name__)


class OrtFusions(ir.passes.InPlacePass):
    """onnxscript's `optimize_for_ort` (SkipRMSNorm, RotaryEmbedding, MultiHeadAttention/GQA, ...).

    ``self.counts`` afterwards holds how many of each fusion applied, for the manifest.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model, counts = optimize_for_ort(model)
        self.counts = {k: v for k, v in counts.items() if v}
        log.info("ORT fusions: %s", self.counts or "none")
        return ir.passes.PassResult(model, modified=bool(self.counts))
