"""Mixtral: softmax over all experts, top-k, renormalised; SwiGLU experts stored as [gate | up]."""

from __future__ import annotations

from ...custom_ops import MoEAttributes
from ...runtime.errors import UnsupportedModelError
from . import register
from .base import FusedMoE, MoEAdapter, interleave_gate_up


@register("MixtralForCausalLM")
class Mixtral(MoEAdapter):
    family = "Mixtral"
    block_class_name = "MixtralSparseMoeBlock"

    def check_config(self, config) -> None:
        if config.hidden_act != "silu":
            raise UnsupportedModelError(
                f"Mixtral with hidden_act={config.hidden_act!r}: ONNX Runtime's MoE op gates SwiGLU with silu only"
            )

    def fuse(self, block, config) -> FusedMoE:
        attrs = MoEAttributes(
            k=config.num_experts_per_tok,
            activation_type="swiglu",
            normalize_routing_weights=1,
            swiglu_fusion=1,
        )
        experts = block.experts
        return FusedMoE(block.gate.weight, interleave_gate_up(experts.gate_up_proj), experts.down_proj, attrs)
