"""LFM2-MoE (Liquid AI): short-convolution and attention layers, MoE feed-forwards on the standard experts
interface (sigmoid router with an expert-bias buffer for the choice, renormalised, scaled).

The MoE part is the generic path's (``standard.py``). What differs is the cache: each short-convolution layer
keeps the last ``conv_L_cache - 1`` inputs of its depthwise causal convolution, a state of fixed size
(batch, hidden, conv_L_cache - 1) that the graph takes and returns (``converter/recurrent.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...runtime.errors import UnsupportedModelError
from ..recurrent import StateStep
from . import register
from .standard import StandardExperts

__all__ = ["Lfm2Moe", "StatefulShortConv"]


class StatefulShortConv(nn.Module):
    """Lfm2MoeShortConv with its convolution state as graph I/O: one code path for prefill and decode.

    transformers pads the prefill's convolution with zeros and, decoding, concatenates its cached inputs
    (``causal_conv1d_update``): both are [past state | new inputs] convolved without padding, the state
    being zeros at prefill. Of the L inputs transformers caches, the first never reaches an output (the
    kernel sees the last L - 1 and the new token), so the state here is the last L - 1 real ones (right padding
    skipped: ``StateStep.conv_state``), as onnxruntime-genai's LFM2 keeps it. Written by hand: transformers'
    module branches on the sequence length and updates its cache in place, which a graph with a dynamic
    sequence cannot follow.
    """

    def __init__(self, conv: nn.Module, step: StateStep) -> None:
        super().__init__()
        self.in_proj, self.conv, self.out_proj = conv.in_proj, conv.conv, conv.out_proj
        self.layer_idx = conv.layer_idx
        self.width = conv.conv_kernel_size - 1
        self.step = step

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        s = self.step
        seq = hidden_states.shape[1]
        hidden_states = hidden_states * s.new_tokens_mask(hidden_states)  # padding never reaches the state
        b, c, x = self.in_proj(hidden_states).transpose(-1, -2).chunk(3, dim=-2)
        window = torch.cat([s.past[self.layer_idx]["conv"], b * x], dim=-1)  # (batch, hidden, L - 1 + seq)
        s.present[self.layer_idx] = {"conv": s.conv_state(window, self.width)}
        out = F.conv1d(window, self.conv.weight, self.conv.bias, groups=self.conv.groups)[:, :, -seq:]
        return self.out_proj((c * out).transpose(-1, -2).contiguous())


@register("Lfm2MoeForCausalLM")
class Lfm2Moe(StandardExperts):
    family = "LFM2-MoE"

    def check_config(self, config) -> None:
        super().check_config(config)
        if not getattr(config, "layer_types", None):
            raise UnsupportedModelError(f"{self.family}: the config has no layer_types (which layers are "
                                        "convolutions and which attention)")
        if config.conv_L_cache < 2:
            raise UnsupportedModelError(f"{self.family}: conv_L_cache {config.conv_L_cache}; a causal convolution "
                                        "with state needs a kernel of 2 or more")

    def layer_types(self, config) -> list[str]:
        return list(config.layer_types)

    def state_shapes(self, config) -> dict[str, dict[str, list[int]]]:
        return {"conv": {"conv": [config.hidden_size, config.conv_L_cache - 1]}}

    def swap_state_layers(self, model: nn.Module, step: StateStep) -> None:
        for layer in model.model.layers:
            if getattr(layer, "conv", None) is not None:
                layer.conv = StatefulShortConv(layer.conv, step)
