"""Phi-3.5-MoE: sparse-mixer routing (top-2 with jitter-threshold masked softmaxes), SwiGLU experts.

The op's ``use_sparse_mixer`` is silently ignored by ONNX Runtime's CPU kernel (docs/design.md), so the
routing is computed by Phi-MoE's own router traced into ordinary ops and fed to the op as explicit
weights (``FusedMoE(route=...)``): exact on every execution provider.
"""

from __future__ import annotations

from ...custom_ops import MoEAttributes
from . import register
from .base import FusedMoE, TopKSoftmaxAdapter, interleave_gate_up


@register("PhimoeForCausalLM")
class Phimoe(TopKSoftmaxAdapter):
    family = "Phi-3.5-MoE"
    block_class_name = "PhimoeSparseMoeBlock"

    def fuse(self, block, config) -> FusedMoE:
        attrs = MoEAttributes(k=config.num_experts_per_tok, activation_type="swiglu", normalize_routing_weights=1,
                              swiglu_fusion=1)
        e = block.experts
        return FusedMoE(None, interleave_gate_up(e.gate_up_proj), e.down_proj, attrs, route=block.router)
