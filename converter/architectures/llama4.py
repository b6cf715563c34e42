"""Llama-4 text: sigmoid top-1 router whose score scales the expert's input, plus a shared expert.

Hugging Face runs every expert on every token, each on the input scaled by its router score
(sigmoid of the top logit for the chosen expert, sigmoid(-inf) = 0 for the others; an expert without
biases maps 0 to 0). With one expert per token that is f_e(s * x), e = argmax of the logits: the op
with top-1 softmax routing on the logits (weight 1) applied to x * sigmoid(max logit). More than one
expert per token mixes differently scaled inputs, which one op cannot, and is refused. The complex
rotary is computed in real arithmetic (``real_rotary.py``); chunked attention, NoPE layers, the L2
q/k norm and the dense/MoE interleave are traced as they are.
"""

from __future__ import annotations

import torch

from ...custom_ops import MoEAttributes
from ...runtime.errors import UnsupportedModelError
from . import register
from .base import FusedMoE, MoEAdapter, interleave_gate_up
from .real_rotary import check_static_rope, use_real_rotary
from .standard import SILU_ACTIVATIONS


class InputScaledTop1MoE(FusedMoE):
    """Top-1 experts on the input scaled by sigmoid(top router logit); returns (output, router logits)."""

    def forward(self, hidden_states: torch.Tensor):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = self.router(x)
        score = torch.sigmoid(logits.max(dim=-1, keepdim=True).values.float()).to(x.dtype)
        a = self.attrs
        out = torch.ops.moerun.moe(
            x * score, logits, self.fc1, None, self.fc2, None, None, None,
            a.k, a.activation_type, a.normalize_routing_weights, a.swiglu_fusion, a.swiglu_limit,
            a.activation_alpha, a.activation_beta,
        )
        return out + self.shared(x), logits


@register("Llama4ForCausalLM")
class Llama4(MoEAdapter):
    family = "Llama-4"
    block_class_name = "Llama4TextMoe"

    def check_config(self, config) -> None:
        if config.num_experts_per_tok != 1:
            raise UnsupportedModelError(
                f"Llama4ForCausalLM with num_experts_per_tok={config.num_experts_per_tok}: each expert sees the "
                "input scaled by its own score, which one MoE op represents for top-1 routing only"
            )
        check_static_rope(config, "Llama4ForCausalLM")
        if config.hidden_act != "silu":
            raise UnsupportedModelError(f"Llama-4 with hidden_act={config.hidden_act!r}: ONNX Runtime's MoE op "
                                        "gates SwiGLU with silu only")

    def swap_moe_blocks(self, model) -> list[str]:
        from transformers.models.llama4 import modeling_llama4

        swapped = super().swap_moe_blocks(model)
        use_real_rotary(model, modeling_llama4, head_axis=2)  # q, k are (B, S, H, D) when rotated
        return swapped

    def fuse(self, block, config) -> InputScaledTop1MoE:
        e = block.experts
        if type(e.act_fn).__name__ not in SILU_ACTIVATIONS:  # pragma: no cover (check_config rejects it first)
            raise UnsupportedModelError("Llama-4 experts without silu gating")
        # experts store (E, H, 2I) with [gate | up] on the last axis and down as (E, I, H): x @ W
        fc1 = interleave_gate_up(e.gate_up_proj.transpose(1, 2))
        attrs = MoEAttributes(k=1, activation_type="swiglu", normalize_routing_weights=1, swiglu_fusion=1)
        return InputScaledTop1MoE(block.router.weight, fc1, e.down_proj.transpose(1, 2), attrs,
                                  shared=block.shared_expert)
