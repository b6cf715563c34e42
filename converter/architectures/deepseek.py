"""DeepSeek-V2 and V3: routing the op cannot compute itself, shared experts, dense first layers, MLA.

V2 routes on softmax scores (greedy or group-limited greedy), V3 on sigmoid scores with a correction
bias, group-limited top-k, optional renormalisation; both scale by routed_scaling_factor. The family's
own router is traced into ordinary ops and its weights fed to the op explicitly (``FusedMoE(route=)``).
Shared experts stay ordinary MatMuls beside the MoE node; the first dense layers and MLA attention
are traced as they are.
"""

from __future__ import annotations

from ...custom_ops import MoEAttributes
from ...runtime.errors import UnsupportedModelError
from ..export import KVShape
from . import register
from .base import FusedMoE, TopKSoftmaxAdapter, interleave_gate_up


@register("DeepseekV3ForCausalLM")
class DeepseekV3(TopKSoftmaxAdapter):
    family = "DeepSeek-V3"
    block_class_name = "DeepseekV3MoE"

    def kv_shape(self, config) -> KVShape:
        # MLA as transformers 5 implements it caches the compressed latents, one "head": the normalised
        # KV latent (kv_lora_rank) as "key" and the rotary key part (qk_rope_head_dim) as "value".
        return KVShape(1, config.kv_lora_rank, config.qk_rope_head_dim)

    def fuse(self, block, config) -> FusedMoE:
        attrs = MoEAttributes(k=config.num_experts_per_tok, activation_type="swiglu", normalize_routing_weights=1,
                              swiglu_fusion=1)
        e = block.experts
        return FusedMoE(None, interleave_gate_up(e.gate_up_proj), e.down_proj, attrs, route=block.gate,
                        shared=block.shared_experts)


@register("DeepseekV2ForCausalLM")
class DeepseekV2(DeepseekV3):
    family = "DeepSeek-V2"
    block_class_name = "DeepseekV2Moe"
    exportable = False

    def check_config(self, config) -> None:
        # Measured with torch 2.13: the MoE maps exactly (same router path as V3), but transformers'
        # DeepSeek-V2 rotary embedding computes in complex numbers (torch.polar / view_as_complex),
        # which torch.onnx cannot translate ("No decompositions registered for the complex-valued input").
        raise UnsupportedModelError(
            "DeepseekV2ForCausalLM: its rotary embedding uses complex tensors, which torch.onnx cannot export "
            "yet; DeepseekV3ForCausalLM (real-valued rotary) is supported"
        )
