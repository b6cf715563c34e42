"""Attention as one fused GroupQueryAttention node per layer, with a KV cache updated in place.

The traced Hugging Face attention is a few dozen small ops per layer (rotary, repeat_kv, masks,
concatenating the cache) that cost as much as the attention itself when decoding. Each attention
module is swapped for ``FusedAttention``: the model's own projections (q, k and v packed into one
MatMul) around one ``moerun::gqa`` call (``custom_ops.gqa_op``), exported as
``com.microsoft.GroupQueryAttention``.

The graph's contract is then onnxruntime-genai's: ``input_ids``, a right-padded ``attention_mask``
(row b's length is its sum; positions follow from it), the past KV per layer, either exactly as
long as the past or one preallocated buffer bound as both past and present.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..custom_ops import gqa_op  # noqa: F401  (registers torch.ops.moerun.gqa)
from ..runtime.errors import UnsupportedModelError

__all__ = ["DecoderWithFusedAttention", "FusedAttention", "unfusable_reason"]

# Rotary types whose frequencies are fixed at load time (a precomputed cos/sin table is exact).
STATIC_ROPE = ("default", "linear", "yarn", "llama3")


@dataclass
class _Step:
    """What every layer's attention needs from the wrapper during one forward (set before the call)."""

    seqlens_k: torch.Tensor | None = None
    total_length: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    past: tuple = ()
    present: dict = field(default_factory=dict)


class FusedAttention(nn.Module):
    """A family's attention module reduced to its projections around one moerun::gqa call."""

    def __init__(self, attn: nn.Module, config, window: int | None, step: _Step) -> None:
        super().__init__()
        self.qkv = _packed(attn.q_proj, attn.k_proj, attn.v_proj)  # one MatMul; the op splits it
        self.o_proj = attn.o_proj
        # Families that normalise or clip q and k before rotary: RMSNorm per head (Qwen3-MoE) or over
        # the whole projection (OLMoE), and OLMoE's clip_qkv. Computed as ordinary ops before the op.
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.clip = getattr(config, "clip_qkv", None)
        self.sinks = getattr(attn, "sinks", None)
        self.layer_idx = attn.layer_idx
        self.num_heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.scale = float(attn.scaling)
        # Hugging Face's window W and ONNX Runtime's local_window_size both show the last W keys.
        self.local_window_size = window or -1
        self.step = step

    def _prepare(self, qkv: torch.Tensor) -> torch.Tensor:
        """Apply the family's q/k norms and clipping to the packed projection, as its attention does."""
        dim = self.qkv.out_features // (self.num_heads + 2 * self.kv_heads)
        q, k, v = qkv.split([self.num_heads * dim, self.kv_heads * dim, self.kv_heads * dim], dim=-1)
        if self.q_norm is not None:
            if self.q_norm.weight.shape[0] == dim:  # per head
                q = self.q_norm(q.unflatten(-1, (self.num_heads, dim))).flatten(-2)
                k = self.k_norm(k.unflatten(-1, (self.kv_heads, dim))).flatten(-2)
            else:
                q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        return torch.cat([q, k, v], dim=-1)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        s = self.step
        past_k, past_v = s.past[2 * self.layer_idx], s.past[2 * self.layer_idx + 1]
        qkv = self.qkv(hidden_states)
        if self.q_norm is not None or self.clip is not None:
            qkv = self._prepare(qkv)
        out, present_k, present_v = torch.ops.moerun.gqa(
            qkv, None, None, past_k, past_v,
            s.seqlens_k, s.total_length, s.cos, s.sin, self.sinks, self.num_heads, self.kv_heads,
            self.local_window_size, self.scale,
        )
        s.present[self.layer_idx] = (present_k, present_v)
        return self.o_proj(out), None


def _packed(*projections: nn.Linear) -> nn.Linear:
    """q, k and v projections as one Linear whose output is [q | k | v] (GroupQueryAttention's packed QKV)."""
    packed = nn.Linear(projections[0].in_features, sum(p.out_features for p in projections),
                       bias=any(p.bias is not None for p in projections), device="meta")
    packed.weight = nn.Parameter(torch.cat([p.weight for p in projections]).detach(), requires_grad=False)
    if packed.bias is not None:
        biases = [p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in projections]
        packed.bias = nn.Parameter(torch.cat(biases).detach(), requires_grad=False)
    return packed


def sliding_window(config, layer_idx: int) -> int | None:
    """The layer's sliding window: per layer from ``layer_types`` where the config has them, else the
    config's ``sliding_window`` for every layer (Mixtral)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return config.sliding_window if layer_types[layer_idx] == "sliding_attention" else None
    return getattr(config, "sliding_window", None)


def unfusable_reason(model: nn.Module) -> str | None:
    """Why this model's attention cannot be one GroupQueryAttention per layer; None when it can."""
    config = model.config
    rope = getattr(getattr(model.model, "rotary_emb", None), "rope_type", None)
    if rope not in STATIC_ROPE:
        return f"rotary type {rope!r} is not a fixed table"
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        return "partial rotary embeddings"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim % 16:  # measured with ORT 1.31: 8 converts, then every run fails ("multiple of 16")
        return f"head size {head_dim} (ONNX Runtime's kernel with rotary needs a multiple of 16)"
    return None


class DecoderWithFusedAttention(nn.Module):
    """forward(input_ids, attention_mask, *past) -> (logits, *presents) with fused attention.

    ``attention_mask`` is right-padded; its row sums give each row's length (seqlens_k), its width
    the batch's longest total length. Logits are for every position, as the traced export's.
    """

    def __init__(self, model: nn.Module, max_positions: int) -> None:
        super().__init__()
        reason = unfusable_reason(model)
        if reason:
            raise UnsupportedModelError(f"attention cannot be fused: {reason}")
        self.model = model
        self.num_layers = model.config.num_hidden_layers
        self.step = _Step()
        for i, layer in enumerate(model.model.layers):
            window = sliding_window(model.config, i)
            layer.self_attn = FusedAttention(layer.self_attn, model.config, window, self.step)
        rotary = model.model.rotary_emb
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), rotary.inv_freq.float())
        dtype = next(model.parameters()).dtype
        self.register_buffer("cos_cache", (freqs.cos() * rotary.attention_scaling).to(dtype), persistent=False)
        self.register_buffer("sin_cache", (freqs.sin() * rotary.attention_scaling).to(dtype), persistent=False)

    def forward(self, input_ids, attention_mask, *past):
        s = self.step
        s.seqlens_k = (attention_mask.sum(-1) - 1).to(torch.int32)
        s.total_length = torch.full((), attention_mask.shape[1], dtype=torch.int32)
        s.cos, s.sin, s.past, s.present = self.cos_cache, self.sin_cache, past, {}
        logits = self.model(input_ids=input_ids, use_cache=False).logits  # the family's own head and scaling
        presents = [t for i in range(self.num_layers) for t in s.present[i]]
        return (logits, *presents)
