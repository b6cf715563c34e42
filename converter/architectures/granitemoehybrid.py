"""Granite-MoE-hybrid (Granite 4.0-H): Mamba-2 and attention layers, Granite-MoE feed-forwards beside a shared MLP.

The MoE block is Granite-MoE's (softmax over the top-k logits, SwiGLU experts [gate | up]); the shared MLP and
Granite's multipliers are traced as they are. The Mamba-2 layers carry a convolution state and an SSM state as
graph I/O (``converter/mamba.py``); the attention layers (rotary or none, as configured) keep a KV cache.
"""

from __future__ import annotations

from torch import nn

from ...runtime.errors import UnsupportedModelError
from ..mamba import StatefulMamba2
from ..recurrent import StateStep
from . import register
from .granitemoe import GraniteMoe

__all__ = ["GraniteMoeHybrid"]


@register("GraniteMoeHybridForCausalLM")
class GraniteMoeHybrid(GraniteMoe):
    family = "Granite-MoE-hybrid"
    block_class_name = "GraniteMoeHybridMoE"

    def check_config(self, config) -> None:
        super().check_config(config)
        if not config.num_local_experts:
            raise UnsupportedModelError(f"{self.family} with num_local_experts=0 is a dense model (no "
                                        "Mixture-of-Experts layers); moerun converts MoE models")
        if config.mamba_d_conv < 2:
            raise UnsupportedModelError(f"{self.family}: mamba_d_conv {config.mamba_d_conv}; a causal convolution "
                                        "with state needs a kernel of 2 or more")

    def layer_types(self, config) -> list[str]:
        return ["mamba" if kind == "linear_attention" else kind for kind in config.layer_types]

    def state_shapes(self, config) -> dict[str, dict[str, list[int]]]:
        intermediate = int(config.mamba_expand * config.hidden_size)
        conv_dim = intermediate + 2 * config.mamba_n_groups * config.mamba_d_state
        return {"mamba": {"conv": [conv_dim, config.mamba_d_conv - 1],
                          "recurrent": [config.mamba_n_heads, config.mamba_d_head, config.mamba_d_state]}}

    def swap_state_layers(self, model: nn.Module, step: StateStep) -> None:
        for layer in model.model.layers:
            if layer.mamba is not None:
                layer.mamba = StatefulMamba2(layer.mamba, step)
