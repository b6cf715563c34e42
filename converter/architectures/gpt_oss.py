"""GPT-OSS: router with bias, softmax over the top-k logits, clamped SwiGLU experts with biases.

Experts: sigmoid(1.702 * g) gating, g clamped above at 7, the linear half clamped to [-7, 7] and
shifted by +1; exactly the op's SwiGLU with activation_alpha, activation_beta=1 and swiglu_limit.
gate_up_proj is stored (E, H, 2I) with gate and up already interleaved along the last axis.
Attention sinks and sliding windows are traced from the eager attention (SDPA has no sinks).
"""

from __future__ import annotations

from ...custom_ops import MoEAttributes
from . import register
from .base import FusedMoE, MoEAdapter


@register("GptOssForCausalLM")
class GptOss(MoEAdapter):
    family = "GPT-OSS"
    block_class_name = "GptOssMLP"
    attn_implementation = "eager"
    fused_attention = True

    def expert_dims(self, config) -> tuple[int, int]:
        return config.hidden_size, config.intermediate_size

    def fuse(self, block, config) -> FusedMoE:
        attrs = MoEAttributes(
            k=config.num_experts_per_tok,
            activation_type="swiglu",
            normalize_routing_weights=1,  # softmax over the top-k logits
            swiglu_fusion=1,
            swiglu_limit=float(config.swiglu_limit),
            activation_alpha=float(config.swiglu_alpha),
            activation_beta=1.0,
        )
        e = block.experts
        return FusedMoE(
            block.router.weight, e.gate_up_proj.transpose(1, 2), e.down_proj.transpose(1, 2), attrs,
            fc1_bias=e.gate_up_proj_bias, fc2_bias=e.down_proj_bias, router_bias=block.router.bias,
            returns_tuple=True,
        )
