"""Qwen3-Next and Qwen3.5-MoE: refused with the reason (hybrids whose linear-attention layers carry
recurrent state)."""

from __future__ import annotations

from ...runtime.errors import UnsupportedModelError
from . import register
from .qwen2_moe import Qwen2Moe


@register("Qwen3NextForCausalLM")
class Qwen3Next(Qwen2Moe):
    family = "Qwen3-Next"
    block_class_name = "Qwen3NextSparseMoeBlock"
    exportable = False

    def check_config(self, config) -> None:
        # Its MoE block is Qwen2-MoE's (shared expert, sigmoid gate) and would map exactly; what is missing is
        # the Gated DeltaNet layer with its convolution and recurrent states as graph I/O (converter/recurrent.py
        # carries such states; LFM2-MoE's short convolutions use it).
        raise UnsupportedModelError(
            f"{self.architectures[0]}: its Gated DeltaNet layers carry convolution and recurrent state, and moerun "
            "does not export the Gated DeltaNet recurrence yet"
        )


@register("Qwen3_5MoeForCausalLM")
class Qwen3_5Moe(Qwen3Next):
    """Qwen3.5-MoE's text model: Qwen3-Next's layout (Gated DeltaNet every few layers, gated attention)."""

    family = "Qwen3.5-MoE"
    block_class_name = "Qwen3_5MoeSparseMoeBlock"
