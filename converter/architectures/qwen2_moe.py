"""Qwen2-MoE: softmax top-k (renormalised only with norm_topk_prob), plus a shared expert gated by a sigmoid.

The shared expert stays ordinary MatMuls beside the MoE node: ONNX Runtime runs shared experts
inside the op on CUDA only, and the exports are portable.
"""

from __future__ import annotations

from . import register
from .base import SigmoidGatedShared, TopKSoftmaxAdapter


@register("Qwen2MoeForCausalLM")
class Qwen2Moe(TopKSoftmaxAdapter):
    family = "Qwen2-MoE"
    block_class_name = "Qwen2MoeSparseMoeBlock"
    fused_attention = True

    def shared_expert(self, block):
        return SigmoidGatedShared(block.shared_expert, block.shared_expert_gate)
