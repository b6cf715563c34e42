"""Qwen3-MoE: softmax top-k, renormalised when norm_topk_prob; dense layers by decoder_sparse_step/mlp_only_layers."""

from __future__ import annotations

from . import register
from .base import TopKSoftmaxAdapter


@register("Qwen3MoeForCausalLM")
class Qwen3Moe(TopKSoftmaxAdapter):
    family = "Qwen3-MoE"
    block_class_name = "Qwen3MoeSparseMoeBlock"
    fused_attention = True
