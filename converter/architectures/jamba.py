"""Jamba (AI21): Mamba-1 and attention layers (no positional encoding), MoE feed-forwards every few layers.

The MoE block routes Mixtral's way without renormalisation (softmax over all experts, the top-k weights used
as they are), SwiGLU experts [gate | up]; the dense layers' MLPs are traced. The Mamba-1 layers carry a
convolution state and an SSM state as graph I/O (``converter/mamba.py``); attention layers keep a KV cache.

transformers' Jamba restarts the SSM state from zero when several tokens follow a cache (its Mamba-1 scan takes
no initial state; measured with 5.24: logits off by 1e-3 on a 2-token continuation), so --verify's oracle runs
such a continuation one token at a time through transformers' own decode step (``prepare_reference``).
"""

from __future__ import annotations

import torch
from torch import nn

from ...runtime.errors import UnsupportedModelError
from ..mamba import StatefulMamba1
from ..recurrent import StateStep
from . import register
from .base import TopKSoftmaxAdapter

__all__ = ["Jamba", "StepwiseContinuation"]


class StepwiseContinuation(nn.Module):
    """A JambaMambaMixer that, given several new tokens and a cache holding a state, runs them one at a time
    (transformers' recurrent decode step, which starts from the cached state); otherwise the mixer as it is."""

    def __init__(self, mixer: nn.Module) -> None:
        super().__init__()
        self.mixer = mixer

    def forward(self, hidden_states: torch.Tensor, cache=None, attention_mask: torch.Tensor | None = None, **kwargs):
        seq = hidden_states.shape[1]
        if cache is None or seq == 1 or cache.get_recurrent_state(self.mixer.layer_idx) is None:
            return self.mixer(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        return torch.cat([self.mixer(hidden_states[:, t:t + 1], cache=cache, **kwargs,
                                     attention_mask=None if attention_mask is None else attention_mask[:, t:t + 1])
                          for t in range(seq)], dim=1)


@register("JambaForCausalLM")
class Jamba(TopKSoftmaxAdapter):
    family = "Jamba"
    block_class_name = "JambaSparseMoeBlock"
    router_attr = "router"

    def normalize(self, config) -> bool:
        return False  # JambaTopKRouter: top-k of the softmax, left unnormalised

    def check_config(self, config) -> None:
        super().check_config(config)
        if config.num_experts < 2 or config.num_experts not in config.layers_num_experts:
            raise UnsupportedModelError(f"{self.family} with num_experts={config.num_experts} in no layer is a dense "
                                        "model (no Mixture-of-Experts layers); moerun converts MoE models")
        if config.mamba_d_conv < 2:
            raise UnsupportedModelError(f"{self.family}: mamba_d_conv {config.mamba_d_conv}; a causal convolution "
                                        "with state needs a kernel of 2 or more")

    def layer_types(self, config) -> list[str]:
        return ["mamba" if kind == "mamba" else "full_attention" for kind in config.layers_block_type]

    def state_shapes(self, config) -> dict[str, dict[str, list[int]]]:
        intermediate = config.mamba_expand * config.hidden_size
        return {"mamba": {"conv": [intermediate, config.mamba_d_conv - 1],
                          "recurrent": [intermediate, config.mamba_d_state]}}

    def prepare_reference(self, model: nn.Module) -> None:
        for layer in model.model.layers:
            if getattr(layer, "mamba", None) is not None:
                layer.mamba = StepwiseContinuation(layer.mamba)

    def swap_state_layers(self, model: nn.Module, step: StateStep) -> None:
        for layer in model.model.layers:
            if getattr(layer, "mamba", None) is not None:
                layer.mamba = StatefulMamba1(layer.mamba, step)
