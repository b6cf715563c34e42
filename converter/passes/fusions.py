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
        _cast_norm_scales(model)
        self.counts = {k: v for k, v in counts.items() if v}
        log.info("ORT fusions: %s", self.counts or "none")
        return ir.passes.PassResult(model, modified=bool(self.counts))


_NORMS = {("", "SimplifiedLayerNormalization"): 1, ("com.microsoft", "SkipSimplifiedLayerNormalization"): 2}


def _cast_norm_scales(model: ir.Model) -> None:
    """Give each fused RMSNorm a scale of its input's type.

    A norm computed in float32 on a float16 input (Qwen3-Next's zero-centred RMSNorm: ``x.float()`` times
    ``1 + weight.float()``, then cast back) is fused with its float32 scale beside the float16 input, and ONNX
    Runtime refuses SkipSimplifiedLayerNormalization with two types. The scale is cast to the input's type (its
    product is still computed in float32 inside the op); the output, then float16, already fed a Cast to float16.
    """
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        index = _NORMS.get((node.domain, node.op_type))
        if index is None or len(node.inputs) <= index:
            continue
        x, scale = node.inputs[0], node.inputs[index]
        if x is None or scale is None or x.dtype is None or scale.dtype in (None, x.dtype):
            continue
        if not all(use.node.op_type == "Cast" for use in node.outputs[0].uses()):
            continue  # only the pattern above (the norm's output cast back): anything else is left as it was
        cast = ir.node("Cast", [scale], attributes={"to": x.dtype})
        cast.outputs[0].dtype, cast.outputs[0].shape = x.dtype, scale.shape
        node.graph.insert_before(node, cast)
        node.replace_input_with(index, cast.outputs[0])
        node.outputs[0].dtype = x.dtype
