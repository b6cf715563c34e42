"""Granite-MoE (and Granite-MoE-Shared): softmax over the top-k logits, SwiGLU experts [gate | up].

The shared MLP of Granite-MoE-Shared sits beside the MoE block in the decoder layer and is traced as
ordinary MatMuls; Granite's embedding, residual and logits multipliers are traced as they are.
"""

from __future__ import annotations

from . import register
from .base import TopKSoftmaxAdapter


@register("GraniteMoeForCausalLM")
class GraniteMoe(TopKSoftmaxAdapter):
    family = "Granite-MoE"
    block_class_name = "GraniteMoeMoE"
    fused_attention = True
    router_attr = "router"

    def normalize(self, config) -> bool:
        return True  # softmax over the top-k logits == softmax over all, renormalised over the top k


@register("GraniteMoeSharedForCausalLM")
class GraniteMoeShared(GraniteMoe):
    family = "Granite-MoE-Shared"
    block_class_name = "GraniteMoeSharedMoE"
