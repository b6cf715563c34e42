"""Families on transformers' standard experts interface (``standard.py``): one line each.

Each traces its own router, shared experts and attention as they are; only the experts become the op.
"""

from __future__ import annotations

from .standard import standard_family

# softmax top-k renormalised with a floor (moe_norm_min), selection biased by moe_statics; shared experts
standard_family("Ernie4_5_MoeForCausalLM", "ERNIE-4.5-MoE")
# sigmoid scores + correction bias, group-limited top-k, routed scaling; shared experts; partial rotary
standard_family("Glm4MoeForCausalLM", "GLM-4-MoE")
# softmax top-k renormalised (float32 router); a shared MLP beside the experts; q/k norms after rotary
standard_family("HunYuanMoEV1ForCausalLM", "Hunyuan-V1-MoE")
# DeepSeek-V3's router (sigmoid, correction bias, group-limited, scaled); shared experts
standard_family("Dots1ForCausalLM", "dots1")
# sigmoid scores + correction bias for the choice, renormalised; q/k norms over the whole projection
standard_family("MiniMaxM2ForCausalLM", "MiniMax-M2")
# softmax top-k, renormalised only with norm_topk_prob; OLMo-2 style norms
standard_family("FlexOlmoForCausalLM", "FlexOlmo")
