"""Qwen3-Next: refused with the reason (a hybrid whose linear-attention layers carry recurrent state)."""

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
        # Its MoE block is Qwen2-MoE's (shared expert, sigmoid gate) and would map exactly; what does not
        # fit is the cache: Gated DeltaNet layers keep convolution and recurrent states, not keys/values,
        # and the decoder I/O (past_key_values.* / present.*) has no place for them yet.
        raise UnsupportedModelError(
            "Qwen3NextForCausalLM: its Gated DeltaNet layers carry convolution and recurrent state, which "
            "moerun's KV-cache decoder I/O cannot represent yet"
        )
