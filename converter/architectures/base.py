"""What every architecture adapter shares: finding the MoE blocks and swapping in the fused op."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict

import torch
from torch import nn

from ...custom_ops import (
    MoEAttributes,
    torch_op,  # noqa: F401  (registers torch.ops.moerun.moe)
)
from ...runtime.errors import UnsupportedModelError

__all__ = ["FusedMoE", "MoEAdapter", "interleave_gate_up"]

log = logging.getLogger(__name__)


def interleave_gate_up(gate_up: torch.Tensor) -> torch.Tensor:
    """[gate | up] halves along dim 1 (Hugging Face) -> rows g0, u0, g1, u1, ... (the op's swiglu_fusion=1)."""
    experts, two_i, hidden = gate_up.shape
    gate, up = gate_up.split(two_i // 2, dim=1)
    return torch.stack([gate, up], dim=2).reshape(experts, two_i, hidden)


class FusedMoE(nn.Module):
    """A sparse MoE block as router MatMul + one moerun::moe call (one com.microsoft.MoE node in ONNX)."""

    def __init__(
        self,
        router_weight: torch.Tensor,
        fc1: torch.Tensor,
        fc2: torch.Tensor,
        attrs: MoEAttributes,
        fc1_bias: torch.Tensor | None = None,
        fc2_bias: torch.Tensor | None = None,
        router_bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.router = nn.Linear(router_weight.shape[1], router_weight.shape[0], bias=router_bias is not None)
        self.router.weight = nn.Parameter(router_weight.detach(), requires_grad=False)
        if router_bias is not None:
            self.router.bias = nn.Parameter(router_bias.detach(), requires_grad=False)
        self.fc1 = nn.Parameter(fc1.detach(), requires_grad=False)
        self.fc2 = nn.Parameter(fc2.detach(), requires_grad=False)
        self.fc1_bias = None if fc1_bias is None else nn.Parameter(fc1_bias.detach(), requires_grad=False)
        self.fc2_bias = None if fc2_bias is None else nn.Parameter(fc2_bias.detach(), requires_grad=False)
        self.attrs = attrs

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = self.router(x)
        a = self.attrs
        out = torch.ops.moerun.moe(
            x, logits, self.fc1, self.fc1_bias, self.fc2, self.fc2_bias, None, None,
            a.k, a.activation_type, a.normalize_routing_weights, a.swiglu_fusion, a.swiglu_limit,
            a.activation_alpha, a.activation_beta,
        )
        return out.reshape(hidden_states.shape)


class MoEAdapter:
    """One model family: where its MoE blocks are and how they map onto com.microsoft.MoE.

    A subclass sets ``block_class_name`` and implements ``fuse``; everything else is shared.
    """

    family: str = ""
    block_class_name: str = ""

    def check_config(self, config) -> None:
        """Raise UnsupportedModelError for configurations the export cannot represent exactly."""

    def num_experts(self, config) -> int:
        return config.num_local_experts

    def experts_per_token(self, config) -> int:
        return config.num_experts_per_tok

    def expert_dims(self, config) -> tuple[int, int]:
        """(hidden, intermediate) of one expert: fc1 is (2*I or I, H), fc2 is (H, I)."""
        return config.hidden_size, getattr(config, "moe_intermediate_size", None) or config.intermediate_size

    def moe_blocks(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for name, module in model.named_modules():
            if type(module).__name__ == self.block_class_name:
                yield name, module

    def fuse(self, block: nn.Module, config) -> FusedMoE:
        raise NotImplementedError

    def swap_moe_blocks(self, model: nn.Module) -> list[str]:
        """Replace every MoE block of ``model`` in place; returns the swapped module names."""
        swapped = []
        for name, block in list(self.moe_blocks(model)):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, self.fuse(block, model.config))
            swapped.append(name)
        if not swapped:
            raise UnsupportedModelError(f"no {self.block_class_name} found in the {self.family} model: nothing to fuse")
        log.info("fused %d MoE blocks (%s)", len(swapped), asdict(next(iter(self._attrs_of(model)))))
        return swapped

    @staticmethod
    def _attrs_of(model: nn.Module) -> Iterator[MoEAttributes]:
        for module in model.modules():
            if isinstance(module, FusedMoE):
                yield module.attrs
