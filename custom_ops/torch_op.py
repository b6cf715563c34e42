"""The torch custom op ``moerun::moe``: an MoE layer as one opaque call while tracing.

The converter swaps each model family's MoE block for a module that calls this op, so
``torch.onnx.export(dynamo=True)`` sees one node per layer and translates it, through
``ONNX_TRANSLATION``, to exactly one ``com.microsoft.MoE`` node. The eager implementation has the
op's semantics (same as ``custom_ops.reference``), so a swapped model still runs in PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from onnxscript import values as osv

from .schemas import DOMAIN, OPSET_VERSION, register_schemas

__all__ = ["moe", "ONNX_TRANSLATION"]


def _activate(h: torch.Tensor, h3: torch.Tensor | None, activation_type: str, swiglu_fusion: int,
              swiglu_limit: float | None, alpha: float, beta: float) -> torch.Tensor:
    if activation_type == "swiglu":
        if swiglu_fusion == 1:
            gate, linear = h[..., 0::2], h[..., 1::2]
        elif swiglu_fusion == 2:
            gate, linear = h.chunk(2, dim=-1)
        else:
            gate, linear = h, h3
        if swiglu_limit is not None:
            gate = gate.clamp(max=swiglu_limit)
            linear = linear.clamp(-swiglu_limit, swiglu_limit)
        return gate * torch.sigmoid(alpha * gate) * (linear + beta)
    return {"relu": F.relu, "silu": F.silu, "gelu": F.gelu, "identity": lambda t: t}[activation_type](h)


@torch.library.custom_op("moerun::moe", mutates_args=())
def moe(
    input: torch.Tensor,
    router_logits: torch.Tensor,
    fc1: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    fc3: torch.Tensor | None,
    fc3_bias: torch.Tensor | None,
    k: int,
    activation_type: str,
    normalize_routing_weights: int,
    swiglu_fusion: int,
    swiglu_limit: float | None,
    activation_alpha: float,
    activation_beta: float,
) -> torch.Tensor:
    """com.microsoft.MoE: softmax routing over router_logits, top-k, experts with weights (E, N, K)."""
    shape = input.shape
    x = input.reshape(-1, shape[-1])
    probs = torch.softmax(router_logits.reshape(x.shape[0], -1).float(), dim=-1)
    weights, idx = torch.topk(probs, k, dim=-1)
    if normalize_routing_weights:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in torch.unique(idx).tolist():
        token, slot = torch.where(idx == e)
        xe = x[token]
        h = F.linear(xe, fc1[e], None if fc1_bias is None else fc1_bias[e])
        h3 = None if fc3 is None else F.linear(xe, fc3[e], None if fc3_bias is None else fc3_bias[e])
        a = _activate(h, h3, activation_type, swiglu_fusion, swiglu_limit, activation_alpha, activation_beta)
        y = F.linear(a, fc2[e], None if fc2_bias is None else fc2_bias[e])
        out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
    return out.reshape(shape)


@moe.register_fake
def _(input, router_logits, fc1, fc1_bias, fc2, fc2_bias, fc3, fc3_bias, k, activation_type,
      normalize_routing_weights, swiglu_fusion, swiglu_limit, activation_alpha, activation_beta):
    return torch.empty_like(input)


register_schemas()
_MoE = osv.Op(osv.Opset(DOMAIN, OPSET_VERSION), "MoE")


def _moe_to_onnx(input, router_logits, fc1, fc1_bias, fc2, fc2_bias, fc3, fc3_bias, k, activation_type,
                 normalize_routing_weights, swiglu_fusion, swiglu_limit, activation_alpha, activation_beta):
    # A plain trace-only function: an @onnxscript.script one fails in the exporter's inliner when an
    # optional input is omitted (docs/design.md). None passes an omitted optional input.
    attrs = dict(k=k, activation_type=activation_type, normalize_routing_weights=normalize_routing_weights,
                 swiglu_fusion=swiglu_fusion, activation_alpha=activation_alpha, activation_beta=activation_beta)
    if swiglu_limit is not None:
        attrs["swiglu_limit"] = swiglu_limit
    return _MoE(input, router_logits, fc1, fc1_bias, fc2, fc2_bias, fc3, fc3_bias, **attrs)


ONNX_TRANSLATION = {torch.ops.moerun.moe.default: _moe_to_onnx}
