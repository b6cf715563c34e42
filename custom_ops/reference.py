"""NumPy reference of com.microsoft.MoE semantics, the oracle for the op contract in tests.

Written by hand: no library computes ONNX Runtime's MoE semantics outside ONNX Runtime itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MoEAttributes", "moe_reference", "route"]


@dataclass(frozen=True)
class MoEAttributes:
    """The attributes of a com.microsoft.MoE node that change its result."""

    k: int = 1
    activation_type: str = "relu"
    normalize_routing_weights: int = 0
    swiglu_fusion: int = 0
    swiglu_limit: float | None = None
    activation_alpha: float = 1.0
    activation_beta: float = 0.0

    def to_onnx(self) -> dict:
        """Keyword attributes for an ONNX node (absent optional ones left out)."""
        attrs = {
            "k": self.k,
            "activation_type": self.activation_type,
            "normalize_routing_weights": self.normalize_routing_weights,
            "swiglu_fusion": self.swiglu_fusion,
            "activation_alpha": self.activation_alpha,
            "activation_beta": self.activation_beta,
        }
        if self.swiglu_limit is not None:
            attrs["swiglu_limit"] = self.swiglu_limit
        return attrs


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def route(router_logits: np.ndarray, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over all experts, top-k, optional renormalisation: (indices, weights), each (T, k)."""
    probs = _softmax(router_logits.astype(np.float64))
    idx = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    weights = np.take_along_axis(probs, idx, axis=-1)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return idx, weights


def _activate(h: np.ndarray, fc3: np.ndarray | None, attrs: MoEAttributes) -> np.ndarray:
    kind = attrs.activation_type
    if kind == "swiglu":
        if attrs.swiglu_fusion == 1:
            gate, linear = h[..., 0::2], h[..., 1::2]
        elif attrs.swiglu_fusion == 2:
            gate, linear = np.split(h, 2, axis=-1)
        else:
            gate, linear = h, fc3
        if attrs.swiglu_limit is not None:
            gate = np.minimum(gate, attrs.swiglu_limit)
            linear = np.clip(linear, -attrs.swiglu_limit, attrs.swiglu_limit)
        sig = 1.0 / (1.0 + np.exp(-attrs.activation_alpha * gate))
        return gate * sig * (linear + attrs.activation_beta)
    if kind == "relu":
        return np.maximum(h, 0.0)
    if kind == "silu":
        return h / (1.0 + np.exp(-h))
    if kind == "gelu":
        from math import erf, sqrt

        return 0.5 * h * (1.0 + np.vectorize(erf)(h / sqrt(2.0)))
    if kind == "identity":
        return h
    raise ValueError(f"unknown activation_type {kind!r}")


def moe_reference(
    x: np.ndarray,
    router_logits: np.ndarray,
    fc1: np.ndarray,
    fc2: np.ndarray,
    attrs: MoEAttributes,
    fc1_bias: np.ndarray | None = None,
    fc2_bias: np.ndarray | None = None,
    fc3: np.ndarray | None = None,
    fc3_bias: np.ndarray | None = None,
) -> np.ndarray:
    """Output of com.microsoft.MoE: weights are (E, N, K) as the op takes them; computed in float64."""
    shape = x.shape
    tokens = x.reshape(-1, shape[-1]).astype(np.float64)
    idx, weights = route(router_logits.reshape(tokens.shape[0], -1), attrs.k, bool(attrs.normalize_routing_weights))
    out = np.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for e, w in zip(idx[t], weights[t]):
            h = fc1[e] @ tokens[t] + (0.0 if fc1_bias is None else fc1_bias[e])
            h3 = None if fc3 is None else fc3[e] @ tokens[t] + (0.0 if fc3_bias is None else fc3_bias[e])
            a = _activate(h, h3, attrs)
            out[t] += w * (fc2[e] @ a + (0.0 if fc2_bias is None else fc2_bias[e]))
    return out.reshape(shape).astype(x.dtype)
