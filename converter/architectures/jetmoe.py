"""JetMoE: a sparse MLP (top-k softmax over the top-k logits, SwiGLU experts, one output bias) and a
mixture of attention heads (MoA) whose query and output projections are experts too.

The MLP is the op: softmax over the top-k logits is renormalised top-k softmax, the experts' gate
and up halves interleave, and the block's output bias is folded into every expert's fc2 bias (the
weights sum to 1, so sum_i w_i (y_i + b) = sum_i w_i y_i + b). transformers' MoA groups tokens by
expert with data-dependent sizes (``tolist``), which torch.export cannot trace; ``DenseMoA`` computes
the same map and reduce with every attention expert applied and the chosen ones gathered: exact, at
num_local_experts times the query/output projection cost (one op cannot return per-slot outputs).
"""

from __future__ import annotations

import torch
from torch import nn

from ...custom_ops import MoEAttributes
from ...runtime.errors import UnsupportedModelError
from ..export import KVShape
from . import register
from .base import FusedMoE, MoEAdapter, interleave_gate_up


class DenseMoA(nn.Module):
    """JetMoE's attention experts (``map`` / ``reduce``) without data-dependent shapes."""

    def __init__(self, moa: nn.Module) -> None:
        super().__init__()
        self.router = moa.router.layer
        self.top_k = moa.top_k
        self.w_in = moa.input_linear.weight  # (E, D, H)
        self.w_out = moa.output_linear.weight  # (E, H, D)
        self.bias = moa.bias

    def map(self, layer_input: torch.Tensor):
        b, s, h = layer_input.shape
        x = layer_input.reshape(-1, h)
        logits = self.router(x).float()
        top_logits, index = logits.topk(self.top_k, dim=1)
        gates = torch.softmax(top_logits, dim=1).type_as(x)
        every = torch.einsum("th,edh->ted", x, self.w_in)  # every expert's query projection
        chosen = every.gather(1, index[..., None].expand(-1, -1, every.shape[-1]))
        return chosen.reshape(b, s, self.top_k, -1), logits, (index, gates)

    def reduce(self, layer_input: torch.Tensor, topo_info):
        index, gates = topo_info
        b, s, k, d = layer_input.shape
        z = layer_input.reshape(-1, k, d)
        every = torch.einsum("tkd,ehd->tkeh", z, self.w_out)  # each slot through every output expert
        chosen = every.gather(2, index[..., None, None].expand(-1, -1, 1, every.shape[-1])).squeeze(2)
        return (chosen * gates[..., None]).sum(dim=1).reshape(b, s, -1) + self.bias


@register("JetMoeForCausalLM")
class JetMoe(MoEAdapter):
    family = "JetMoE"
    block_class_name = "JetMoeMoE"

    def check_config(self, config) -> None:
        if config.activation_function != "silu":
            raise UnsupportedModelError(f"JetMoE with activation_function={config.activation_function!r}: ONNX "
                                        "Runtime's MoE op gates SwiGLU with silu only")

    def kv_shape(self, config) -> KVShape:
        return KVShape(config.num_key_value_heads, config.kv_channels, config.kv_channels)

    def fuse(self, block, config) -> FusedMoE:
        attrs = MoEAttributes(k=config.num_experts_per_tok, activation_type="swiglu", normalize_routing_weights=1,
                              swiglu_fusion=1)
        fc1 = interleave_gate_up(block.input_linear.weight)  # (E, 2I, H): [activated | linear] halves
        fc2 = block.output_linear.weight  # (E, H, I)
        return FusedMoE(block.router.layer.weight, fc1, fc2, attrs,
                        fc2_bias=block.bias.expand(fc2.shape[0], -1))

    def swap_moe_blocks(self, model: nn.Module) -> list[str]:
        swapped = super().swap_moe_blocks(model)
        for layer in model.model.layers:
            layer.self_attention.experts = DenseMoA(layer.self_attention.experts)
        return swapped
