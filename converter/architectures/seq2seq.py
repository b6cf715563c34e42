"""What the encoder-decoder (translation) adapters share: cross-attention geometry and FFN experts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...custom_ops import MoEAttributes
from .base import FusedMoE, MoEAdapter

__all__ = ["CrossAttention", "Seq2SeqAdapter", "stack_experts"]


@dataclass(frozen=True)
class CrossAttention:
    """One decoder layer's cross-attention key/value projections (nn.Linear) and head layout."""

    key: nn.Linear
    value: nn.Linear
    heads: int
    head_dim: int

    def keys_values(self, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, heads, source_length, head_dim) keys and values, computed once per source."""
        batch, length, _ = encoder_hidden_states.shape
        k = self.key(encoder_hidden_states).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        v = self.value(encoder_hidden_states).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        return k, v


def stack_experts(experts: list[nn.Linear], scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(E, out, in) weights and (E, out) biases (None without bias) of a list of per-expert Linears."""
    weight = torch.stack([e.weight.detach() for e in experts]) * scale
    if experts[0].bias is None:
        return weight, None
    return weight, torch.stack([e.bias.detach() for e in experts]) * scale


class Seq2SeqAdapter(MoEAdapter):
    """An encoder-decoder family: exported as an encoder graph and a decoder graph with KV cache."""

    seq2seq = True
    attn_implementation = "eager"
    activations = ("relu", "gelu", "silu")

    def decoder_layers(self, config) -> int:
        raise NotImplementedError

    def cross_attention(self, model: nn.Module) -> list[CrossAttention]:
        raise NotImplementedError

    def fused(self, router: nn.Linear, fc1: list[nn.Linear], fc2: list[nn.Linear], attrs: MoEAttributes,
              output_scale: float = 1.0) -> FusedMoE:
        w1, b1 = stack_experts(fc1)
        w2, b2 = stack_experts(fc2, output_scale)
        return FusedMoE(router.weight.detach(), w1, w2, attrs, fc1_bias=b1, fc2_bias=b2,
                        router_bias=None if router.bias is None else router.bias.detach())
