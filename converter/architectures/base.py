"""What every architecture adapter shares: finding the MoE blocks and swapping in the fused op."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, replace

import torch
from torch import nn

from ...custom_ops import (
    MoEAttributes,
    torch_op,  # noqa: F401  (registers torch.ops.moerun.moe)
)
from ...runtime.errors import UnsupportedModelError
from ..export import KVShape, kv_shape

__all__ = ["FusedMoE", "MoEAdapter", "SigmoidGatedShared", "TopKSoftmaxAdapter", "explicit_routing",
           "interleave_gate_up"]

log = logging.getLogger(__name__)


def interleave_gate_up(gate_up: torch.Tensor) -> torch.Tensor:
    """[gate | up] halves along dim 1 (Hugging Face) -> rows g0, u0, g1, u1, ... (the op's swiglu_fusion=1)."""
    experts, two_i, hidden = gate_up.shape
    gate, up = gate_up.split(two_i // 2, dim=1)
    return torch.stack([gate, up], dim=2).reshape(experts, two_i, hidden)


def explicit_routing(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                     num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A routing computed outside the op, as the op's (router logits, output scale).

    log(weights) on the chosen experts, a huge negative elsewhere: with renormalisation on, the op
    mixes with weights / sum(weights), and the output times sum(weights) is the family's mix exactly
    (docs/design.md). The log is taken in float32, floored at its smallest normal number so that a
    zero weight stays finite.
    """
    floor = torch.finfo(x.dtype).min / 2
    log_weights = weights.float().clamp_min(torch.finfo(torch.float32).tiny).log()
    logits = x.new_full((x.shape[0], num_experts), floor).scatter(-1, indices, log_weights.to(x.dtype))
    return logits, weights.sum(dim=-1, keepdim=True)


class FusedMoE(nn.Module):
    """A sparse MoE block as router MatMul + one moerun::moe call (one com.microsoft.MoE node in ONNX)."""

    def __init__(
        self,
        router_weight: torch.Tensor | None,
        fc1: torch.Tensor,
        fc2: torch.Tensor,
        attrs: MoEAttributes,
        fc1_bias: torch.Tensor | None = None,
        fc2_bias: torch.Tensor | None = None,
        router_bias: torch.Tensor | None = None,
        shared: nn.Module | None = None,
        returns_tuple: bool = False,
        route: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.shared = shared
        self.returns_tuple = returns_tuple  # blocks whose forward returns (hidden, router_scores)
        # Either a linear router whose logits feed the op's softmax routing, or ``route``: the family's
        # own router module returning (logits, weights, indices) for routings the op cannot compute
        # (sparse mixer, sigmoid/group-limited scores, routed scaling). Those are fed to the op exactly
        # as log(weights) on the chosen experts and a huge negative elsewhere with renormalisation on,
        # then scaled by sum(weights): the op then mixes with weights / sum(weights) (docs/design.md).
        self.route = route
        if route is None and router_weight is not None:  # None and None: the caller routes (FusedExperts)
            self.router = nn.Linear(router_weight.shape[1], router_weight.shape[0], bias=router_bias is not None)
            self.router.weight = nn.Parameter(router_weight.detach(), requires_grad=False)
            if router_bias is not None:
                self.router.bias = nn.Parameter(router_bias.detach(), requires_grad=False)
        self.fc1 = nn.Parameter(fc1.detach(), requires_grad=False)
        self.fc2 = nn.Parameter(fc2.detach(), requires_grad=False)
        self.fc1_bias = None if fc1_bias is None else nn.Parameter(fc1_bias.detach(), requires_grad=False)
        self.fc2_bias = None if fc2_bias is None else nn.Parameter(fc2_bias.detach(), requires_grad=False)
        # ONNX Runtime 1.31's CPU MoE kernel returns wrong results with normalize_routing_weights=0 when
        # it may reuse its input buffer in place (measured: errors of order 1 behind a Reshape). So
        # unnormalised top-k routing is emitted exactly as renormalised routing times the top-k
        # probability mass, sum_S p_i * y_i = (sum_S p) * sum_S (p_i / sum_S p) * y_i: never the buggy path.
        self.scale_by_topk_mass = route is None and not attrs.normalize_routing_weights
        self.attrs = replace(attrs, normalize_routing_weights=1)
        self.routing = attrs  # what the model means, as it was given

    def _router_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The op's router input and the factor its output is scaled by (None: no scaling)."""
        if self.route is not None:
            logits, weights, indices = self.route(x)
            return explicit_routing(x, indices, weights, logits.shape[-1])
        logits = self.router(x)
        if self.scale_by_topk_mass:
            return logits, torch.softmax(logits.float(), dim=-1).topk(self.attrs.k, dim=-1).values.sum(-1, True)
        return logits, None

    def forward(self, hidden_states: torch.Tensor, *_unused):
        # _unused: NLLB-MoE passes its attention mask, used there only to zero pad tokens' expert output
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits, scale = self._router_input(x)
        a = self.attrs
        out = torch.ops.moerun.moe(
            x, logits, self.fc1, self.fc1_bias, self.fc2, self.fc2_bias, None, None,
            a.k, a.activation_type, a.normalize_routing_weights, a.swiglu_fusion, a.swiglu_limit,
            a.activation_alpha, a.activation_beta,
        )
        if scale is not None:
            out = out * scale.to(out.dtype)
        if self.shared is not None:  # shared experts stay ordinary MatMuls beside the MoE node (portable)
            out = out + self.shared(x)
        out = out.reshape(hidden_states.shape)
        return (out, None) if self.returns_tuple else out


class SigmoidGatedShared(nn.Module):
    """A shared expert scaled per token by sigmoid(gate(x)) (Qwen2-MoE)."""

    def __init__(self, mlp: nn.Module, gate: nn.Module) -> None:
        super().__init__()
        self.mlp, self.gate = mlp, gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate(x)) * self.mlp(x)


class MoEAdapter:
    """One model family: where its MoE blocks are and how they map onto com.microsoft.MoE.

    A subclass sets ``block_class_name`` and implements ``fuse``; everything else is shared.
    """

    family: str = ""
    block_class_name: str = ""
    exportable = True  # False: the adapter exists to refuse with the precise reason
    # Attention implementation to trace: SDPA where the family supports it (GPT-OSS's sinks need eager).
    attn_implementation: str = "sdpa"
    # True: its attention (q/k/v/o projections, static rotary) becomes one GroupQueryAttention per layer.
    fused_attention: bool = False

    def check_config(self, config) -> None:
        """Raise UnsupportedModelError for configurations the export cannot represent exactly."""

    def num_experts(self, config) -> int:
        return getattr(config, "num_local_experts", None) or config.num_experts

    def experts_per_token(self, config) -> int:
        return config.num_experts_per_tok

    def kv_shape(self, config) -> KVShape:
        """The KV-cache geometry this family's attention writes."""
        return kv_shape(config)

    def layer_types(self, config) -> list[str]:
        """Hybrid families: each layer's kind (the config's ``layer_types``); [] when every layer is attention."""
        return []

    def state_shapes(self, config) -> dict[str, dict[str, list[int]]]:
        """Hybrid families: for each layer kind that carries fixed-size state instead of a KV cache, its states'
        shapes without the batch dimension ({"conv": {"conv": [hidden, kernel - 1]}}); {}: a KV cache only."""
        return {}

    def swap_state_layers(self, model: nn.Module, step) -> None:
        """Hybrid families: swap each stateful module for one whose state is graph I/O through ``step``
        (``converter.recurrent.StateStep``)."""
        raise NotImplementedError(f"{self.family} declares state_shapes but swaps no stateful layers")

    def expert_dims(self, config) -> tuple[int, int]:
        """(hidden, intermediate) of one expert: fc1 is (2*I or I, H), fc2 is (H, I)."""
        return config.hidden_size, getattr(config, "moe_intermediate_size", None) or config.intermediate_size

    def moe_blocks(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for name, module in model.named_modules():
            if type(module).__name__ == self.block_class_name:
                yield name, module

    def fuse(self, block: nn.Module, config) -> FusedMoE:
        raise NotImplementedError

    def prepare_reference(self, model: nn.Module) -> None:
        """Make the PyTorch model compute the family's true semantics before it serves as --verify's oracle."""

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
        routing = next(m.routing for m in model.modules() if isinstance(m, FusedMoE))
        log.info("fused %d MoE blocks (%s)", len(swapped), asdict(routing))
        return swapped


class TopKSoftmaxAdapter(MoEAdapter):
    """Families whose router is softmax over all experts, top-k, renormalised when ``norm_topk_prob``
    (absent: renormalised, as Mixtral), with SwiGLU experts stored as ``gate_up_proj`` [gate | up].
    Softmax over the top-k logits only (Granite, GPT-OSS) is the same as renormalised top-k softmax."""

    router_attr = "gate"

    def normalize(self, config) -> bool:
        return bool(getattr(config, "norm_topk_prob", True))

    def check_config(self, config) -> None:
        if config.hidden_act != "silu":
            raise UnsupportedModelError(
                f"{self.family} with hidden_act={config.hidden_act!r}: "
                "ONNX Runtime's MoE op gates SwiGLU with silu only"
            )

    def shared_expert(self, block: nn.Module) -> nn.Module | None:
        return None

    def fuse(self, block, config) -> FusedMoE:
        attrs = MoEAttributes(
            k=self.experts_per_token(config),
            activation_type="swiglu",
            normalize_routing_weights=int(self.normalize(config)),
            swiglu_fusion=1,
        )
        experts = block.experts
        router = getattr(block, self.router_attr)
        return FusedMoE(router.weight, interleave_gate_up(experts.gate_up_proj), experts.down_proj, attrs,
                        shared=self.shared_expert(block))
