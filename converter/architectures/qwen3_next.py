"""Qwen3-Next and Qwen3.5-MoE: hybrids of Gated DeltaNet (linear attention with convolution and recurrent state)
and gated full attention, every feed-forward a Qwen2-MoE block (softmax top-k, a shared expert gated by a sigmoid).

The MoE block maps as Qwen2-MoE's. The attention layers (an output gate on the query projection, q/k norms,
partial rotary in Qwen3.5) are traced as transformers has them, with their KV cache. Each Gated DeltaNet layer
carries two fixed-size states, ``past.{i}.conv`` and ``past.{i}.recurrent`` (onnxruntime-genai's names for
these models), through ``converter/gated_deltanet.py``.
"""

from __future__ import annotations

from torch import nn

from ...runtime.errors import UnsupportedModelError
from .. import gated_deltanet
from ..recurrent import StateStep
from . import register
from .qwen2_moe import Qwen2Moe

__all__ = ["Qwen3Next", "Qwen3_5Moe"]


@register("Qwen3NextForCausalLM")
class Qwen3Next(Qwen2Moe):
    family = "Qwen3-Next"
    block_class_name = "Qwen3NextSparseMoeBlock"
    fused_attention = False  # gated attention (sigmoid output gate, q/k norms): traced

    def check_config(self, config) -> None:
        super().check_config(config)
        kinds = set(getattr(config, "layer_types", None) or [])
        if not kinds or not kinds <= {"linear_attention", "full_attention"}:
            raise UnsupportedModelError(f"{self.family}: layer_types {sorted(kinds)}; moerun maps linear_attention "
                                        "(Gated DeltaNet) and full_attention layers")
        if config.linear_conv_kernel_dim < 2:
            raise UnsupportedModelError(f"{self.family}: linear_conv_kernel_dim {config.linear_conv_kernel_dim}; a "
                                        "causal convolution with state needs a kernel of 2 or more")
        if config.linear_num_value_heads % config.linear_num_key_heads:
            raise UnsupportedModelError(f"{self.family}: {config.linear_num_value_heads} value heads do not divide "
                                        f"into {config.linear_num_key_heads} key heads")

    def layer_types(self, config) -> list[str]:
        return list(config.layer_types)

    def state_shapes(self, config) -> dict[str, dict[str, list[int]]]:
        return {"linear_attention": gated_deltanet.state_shapes(config)}

    def swap_state_layers(self, model: nn.Module, step: StateStep) -> None:
        for layer in model.model.layers:
            if getattr(layer, "linear_attn", None) is not None:
                layer.linear_attn = gated_deltanet.StatefulGatedDeltaNet(layer.linear_attn, step)


@register("Qwen3_5MoeForCausalLM")
class Qwen3_5Moe(Qwen3Next):
    """Qwen3.5-MoE's text model: Qwen3-Next's layout; separate q/k/v, z, b, a projections in the Gated DeltaNet, a
    router that always renormalises its top-k."""

    family = "Qwen3.5-MoE"
    block_class_name = "Qwen3_5MoeSparseMoeBlock"

    def normalize(self, config) -> bool:
        return True  # Qwen3_5MoeTopKRouter renormalises unconditionally (its config has no norm_topk_prob)
