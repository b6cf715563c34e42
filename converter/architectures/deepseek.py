"""DeepSeek-V2 and V3: routing the op cannot compute itself, shared experts, dense first layers, MLA.

Both are standard-experts families (``standard.py``): V2's router (softmax scores, greedy or
group-limited greedy) and V3's (sigmoid scores with a correction bias, group-limited top-k, optional
renormalisation), both scaled by routed_scaling_factor, are traced as they are and their weights reach
the op exactly; shared experts, the first dense layers and MLA attention are traced as they are.
V2's rotary embedding is complex-valued in transformers (torch.polar, view_as_complex), which
torch.onnx cannot translate; the export computes the same rotation in real arithmetic (``real_rotary.py``).
"""

from __future__ import annotations

from torch import nn

from ..export import KVShape
from . import register
from .real_rotary import check_static_rope, use_real_rotary
from .standard import StandardExperts, standard_family


def mla_kv_shape(self, config) -> KVShape:
    """MLA as transformers 5 implements it caches the compressed latents, one "head": the normalised KV
    latent (kv_lora_rank) as "key" and the rotary key part (qk_rope_head_dim) as "value"."""
    return KVShape(1, config.kv_lora_rank, config.qk_rope_head_dim)


standard_family("DeepseekV3ForCausalLM", "DeepSeek-V3", kv_shape=mla_kv_shape)


@register("DeepseekV2ForCausalLM")
class DeepseekV2(StandardExperts):
    family = "DeepSeek-V2"
    kv_shape = mla_kv_shape

    def check_config(self, config) -> None:
        super().check_config(config)
        check_static_rope(config, "DeepseekV2ForCausalLM")

    def swap_moe_blocks(self, model: nn.Module) -> list[str]:
        from transformers.models.deepseek_v2 import modeling_deepseek_v2

        swapped = super().swap_moe_blocks(model)
        use_real_rotary(model, modeling_deepseek_v2, head_axis=1)  # q_pe, k_pe are (B, H, S, D)
        return swapped

