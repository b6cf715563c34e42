"""transformers 5's standard experts interface: any family whose MoE block calls an experts module
``experts(hidden_states, top_k_index, top_k_weights)`` holding 3-D ``gate_up_proj`` / ``down_proj``.

Such modules are decorated with ``use_experts_implementation``, which records their layout on the
instance (``has_gate``, ``has_bias``, ``is_transposed``, ``is_concatenated``, ``has_post_expert_norm``)
and gives them ``_apply_gate``. They are found by that structure, not by class name, and only the
experts module is swapped (``FusedExperts``): the family's own block forward stays and is traced as it
is, with its router (softmax, sigmoid, group-limited, correction biases, scaling), shared experts
and gates. The routing it computes reaches the op exactly (``explicit_routing``). A family of this
shape is one ``standard_family(...)`` line; what the op cannot compute is refused with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ...custom_ops import MoEAttributes
from ...runtime.errors import UnsupportedModelError
from . import register
from .base import FusedMoE, MoEAdapter, explicit_routing, interleave_gate_up

__all__ = ["FusedExperts", "StandardExperts", "is_standard_experts", "standard_family"]

_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "moe_topk", "top_k")
# Activations of the gate half that the op's SwiGLU computes: x * sigmoid(alpha * x) with alpha = 1.
SILU_ACTIVATIONS = ("SiLU", "SiLUActivation")


def is_standard_experts(module: nn.Module) -> bool:
    """An experts module of transformers' standard interface (3-D expert weights, recorded layout)."""
    if not all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "is_concatenated")):
        return False
    first = getattr(module, "gate_up_proj" if module.has_gate else "up_proj", None)
    down = getattr(module, "down_proj", None)
    return isinstance(first, torch.Tensor) and isinstance(down, torch.Tensor) and first.dim() == down.dim() == 3


def _first(config, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if value:
            return max(value) if isinstance(value, (list, tuple)) else int(value)
    return None


class FusedExperts(FusedMoE):
    """A standard experts module as one moerun::moe call; the family's block routes and calls it."""

    def __init__(self, fc1: torch.Tensor, fc2: torch.Tensor, attrs: MoEAttributes, num_experts: int,
                 fc1_bias: torch.Tensor | None = None, fc2_bias: torch.Tensor | None = None) -> None:
        super().__init__(None, fc1, fc2, attrs, fc1_bias=fc1_bias, fc2_bias=fc2_bias)
        self.num_experts = num_experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        k = top_k_index.shape[-1]
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # (tokens, hidden) whatever the caller's shape
        logits, scale = explicit_routing(x, top_k_index.reshape(-1, k), top_k_weights.reshape(-1, k), self.num_experts)
        a = self.attrs
        out = torch.ops.moerun.moe(
            x, logits, self.fc1, self.fc1_bias, self.fc2, self.fc2_bias, None, None,
            k, a.activation_type, a.normalize_routing_weights, a.swiglu_fusion, a.swiglu_limit,
            a.activation_alpha, a.activation_beta,
        )
        return (out * scale.to(out.dtype)).reshape(hidden_states.shape)


class StandardExperts(MoEAdapter):
    """Every module of the standard experts interface becomes ``FusedExperts``; the rest is traced."""

    block_class_name = "standard experts module"

    def num_experts(self, config) -> int:
        return _first(config, _EXPERT_COUNT_KEYS)

    def experts_per_token(self, config) -> int:
        return _first(config, _TOP_K_KEYS)

    def check_config(self, config) -> None:
        if not self.num_experts(config) or not self.experts_per_token(config):
            raise UnsupportedModelError(f"{self.family}: the config names no expert count or top-k "
                                        f"({'/'.join(_EXPERT_COUNT_KEYS)}; {'/'.join(_TOP_K_KEYS)})")

    def moe_blocks(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for name, module in model.named_modules():
            if is_standard_experts(module):
                yield name, module

    def fuse(self, experts: nn.Module, config) -> FusedExperts:
        from transformers.integrations.moe import _default_apply_gate

        what = f"{self.family} ({type(experts).__name__})"
        if not experts.has_gate:
            raise UnsupportedModelError(f"{what}: non-gated experts; moerun maps gated (SwiGLU) experts only")
        if getattr(experts, "has_post_expert_norm", False):
            raise UnsupportedModelError(f"{what}: a norm after each expert, which ONNX Runtime's MoE op lacks")
        if getattr(type(experts), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
            raise UnsupportedModelError(f"{what}: a custom expert gate the standard mapping cannot represent")
        act_fn = getattr(experts, "act_fn", None)
        act = "silu" if act_fn is torch.nn.functional.silu else type(act_fn).__name__  # a module, or F.silu (LFM2-MoE)
        if act != "silu" and act not in SILU_ACTIVATIONS:
            raise UnsupportedModelError(f"{what}: expert activation {act}; ONNX Runtime's MoE op gates SwiGLU "
                                        "with silu only")
        gate_up, down = experts.gate_up_proj, experts.down_proj
        bias_up = experts.gate_up_proj_bias if experts.has_bias else None
        bias_down = experts.down_proj_bias if experts.has_bias else None
        if experts.is_transposed:  # stored (E, in, out): the op takes (E, out, in)
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        if experts.is_concatenated:  # [gate | up] halves -> interleaved rows (swiglu_fusion=1)
            gate_up = interleave_gate_up(gate_up)
            if bias_up is not None:
                bias_up = interleave_gate_up(bias_up.unsqueeze(-1)).squeeze(-1)
        attrs = MoEAttributes(k=self.experts_per_token(config), activation_type="swiglu",
                              normalize_routing_weights=1, swiglu_fusion=1)
        return FusedExperts(gate_up, down, attrs, gate_up.shape[0], fc1_bias=bias_up, fc2_bias=bias_down)


def standard_family(architecture: str, family: str, **overrides) -> type[StandardExperts]:
    """Register ``architecture`` as a standard-experts family; ``overrides`` set class attributes."""
    cls = type(architecture.removesuffix("ForCausalLM"), (StandardExperts,), {"family": family, **overrides})
    return register(architecture)(cls)
