"""OLMoE: softmax over (typically 64) experts, top-8, no renormalisation (norm_topk_prob False)."""

from __future__ import annotations

from . import register
from .base import TopKSoftmaxAdapter


@register("OlmoeForCausalLM")
class Olmoe(TopKSoftmaxAdapter):
    family = "OLMoE"
    block_class_name = "OlmoeSparseMoeBlock"
    fused_attention = True
