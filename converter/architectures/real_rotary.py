"""Complex-valued rotary embeddings (DeepSeek-V2, Llama-4) as the same rotation in real arithmetic.

transformers computes these rotaries with torch.polar and view_as_complex, which torch.onnx cannot
translate ("No decompositions registered for the complex-valued input"). ``use_real_rotary`` swaps
the model's rotary module for one returning stack(cos, sin) and runs each attention module with its
modeling file's ``apply_rotary_emb`` replaced by the real-valued product, only while that exported
attention runs: the Hugging Face model itself is untouched. Written by hand: (a + ib)(cos + i sin) on
consecutive pairs, exactly what view_as_complex pairs.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import nn

from ...runtime.errors import UnsupportedModelError

__all__ = ["RealRotaryAttention", "RealRotaryEmbedding", "check_static_rope", "use_real_rotary"]

# Rotary types whose inverse frequencies are fixed at load time (the others update them per call).
STATIC_ROPE = ("default", "linear", "yarn", "llama3")


def check_static_rope(config, what: str) -> None:
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in STATIC_ROPE:
        raise UnsupportedModelError(f"{what} with rope_type {rope!r}: its frequencies change per call; "
                                    f"supported: {', '.join(STATIC_ROPE)}")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(3).type_as(x)


def _apply_real(xq: torch.Tensor, xk: torch.Tensor, freqs: torch.Tensor, head_axis: int):
    """``apply_rotary_emb(xq, xk, freqs_cis)`` with ``freqs`` = stack(cos, sin) of shape (B, S, D / 2, 2);
    the heads of q and k sit on ``head_axis`` (1: (B, H, S, D), 2: (B, S, H, D))."""
    cos, sin = freqs[..., 0].unsqueeze(head_axis), freqs[..., 1].unsqueeze(head_axis)
    return _rotate(xq, cos, sin), _rotate(xk, cos, sin)


class RealRotaryEmbedding(nn.Module):
    """The model's rotary embedding as stack(cos, sin) * attention_scaling, shape (B, S, dim / 2, 2)."""

    def __init__(self, rotary: nn.Module) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rotary.inv_freq, persistent=False)
        self.attention_scaling = rotary.attention_scaling

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        return torch.stack([freqs.cos(), freqs.sin()], dim=-1) * self.attention_scaling


class RealRotaryAttention(nn.Module):
    """An attention module run with its modeling file's ``apply_rotary_emb`` in real arithmetic."""

    def __init__(self, attn: nn.Module, modeling: ModuleType, head_axis: int) -> None:
        super().__init__()
        self.attn = attn
        self._modeling = modeling
        self._real_apply = functools.partial(_apply_real, head_axis=head_axis)

    @contextlib.contextmanager
    def _real(self) -> Iterator[None]:
        complex_version = self._modeling.apply_rotary_emb
        self._modeling.apply_rotary_emb = self._real_apply
        try:
            yield
        finally:
            self._modeling.apply_rotary_emb = complex_version

    def forward(self, *args, **kwargs):
        with self._real():
            return self.attn(*args, **kwargs)


def use_real_rotary(model: nn.Module, modeling: ModuleType, head_axis: int) -> None:
    """Swap ``model.model.rotary_emb`` and every layer's ``self_attn`` for their real-valued versions."""
    model.model.rotary_emb = RealRotaryEmbedding(model.model.rotary_emb)
    for layer in model.model.layers:
        layer.self_attn = RealRotaryAttention(layer.self_attn, modeling, head_axis)
