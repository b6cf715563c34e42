"""DBRX: softmax top-k routing normalised by a p-norm, SwiGLU experts stored flat as w1, v1, w2.

Its experts module takes the standard call (hidden_states, top_k_index, top_k_weights) but keeps the
weights as (E * I, H) matrices: w1 (gate) and v1 (up) become the op's interleaved fc1, w2 (used as
x @ w2) its fc2 transposed. The router and its p-norm normalisation are traced as they are.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ...custom_ops import MoEAttributes
from ...runtime.errors import UnsupportedModelError
from . import register
from .standard import SILU_ACTIVATIONS, FusedExperts, StandardExperts


@register("DbrxForCausalLM")
class Dbrx(StandardExperts):
    family = "DBRX"
    block_class_name = "DbrxExperts"

    def num_experts(self, config) -> int:
        return config.ffn_config.moe_num_experts

    def experts_per_token(self, config) -> int:
        return config.ffn_config.moe_top_k

    def expert_dims(self, config) -> tuple[int, int]:
        return config.d_model, config.ffn_config.ffn_hidden_size

    def moe_blocks(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for name, module in model.named_modules():
            if type(module).__name__ == self.block_class_name:
                yield name, module

    def fuse(self, experts: nn.Module, config) -> FusedExperts:
        mlp = experts.mlp
        act = type(mlp.activation_fn).__name__
        if act not in SILU_ACTIVATIONS:
            raise UnsupportedModelError(f"DBRX with expert activation {act}; ONNX Runtime's MoE op gates SwiGLU "
                                        "with silu only")
        e, i, h = experts.num_experts, experts.ffn_hidden_size, experts.hidden_size
        gate, up, down = (w.reshape(e, i, h) for w in (mlp.w1, mlp.v1, mlp.w2))
        fc1 = torch.stack([gate, up], dim=2).reshape(e, 2 * i, h)  # rows g0, u0, g1, u1, ... (swiglu_fusion=1)
        attrs = MoEAttributes(k=self.experts_per_token(config), activation_type="swiglu",
                              normalize_routing_weights=1, swiglu_fusion=1)
        return FusedExperts(fc1, down.transpose(1, 2), attrs, e)
