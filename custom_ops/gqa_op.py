"""The torch custom op ``moerun::gqa``: a layer's attention core as one opaque call while tracing.

The converter swaps each attention module of a family that allows it for ``converter.attention.
FusedAttention``, which keeps the model's own projections and calls this op for rotary embeddings,
the KV-cache update and grouped-query attention (sliding window, attention sinks). ``ONNX_TRANSLATION``
turns the call into one ``com.microsoft.GroupQueryAttention`` node, ONNX Runtime's fused kernel,
whose KV cache can be one preallocated buffer bound as both past and present (updated in place).

Semantics (those of the ONNX Runtime kernel, which the eager implementation below follows):
batches are right-padded; row b holds ``seqlens_k[b] + 1`` tokens after this call. A call whose
sequence length equals ``total_sequence_length`` is a first prompt (positions 0..S-1); otherwise the
S new tokens of row b sit at positions ``seqlens_k[b] + 1 - S`` onwards. Query i at position p sees
the last ``local_window_size`` keys up to p, itself included (measured on ONNX Runtime 1.31, prompt
and decode: its docs say one more), all of them with -1; each head's sink adds exp(sink) to the
softmax denominator.
"""

from __future__ import annotations

import torch
from onnxscript import values as osv

from .schemas import DOMAIN, OPSET_VERSION, register_schemas

__all__ = ["ONNX_TRANSLATION", "gqa"]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved rotary embedding of x (..., D) with cos/sin (..., D/2)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


@torch.library.custom_op("moerun::gqa", mutates_args=())
def gqa(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    seqlens_k: torch.Tensor,
    total_sequence_length: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    head_sink: torch.Tensor | None,
    num_heads: int,
    kv_num_heads: int,
    local_window_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output (B, S, num_heads * D), present_key, present_value (B, kv_num_heads, max(P, total), D)).

    With key and value None, query is packed [q | k | v] along its last axis.
    """
    batch, seq, _ = query.shape
    dim = past_key.shape[-1]
    if key is None:
        query, key, value = query.split([num_heads * dim, kv_num_heads * dim, kv_num_heads * dim], dim=-1)
    total = int(total_sequence_length)
    length = max(past_key.shape[2], total)
    present_k = query.new_zeros(batch, kv_num_heads, length, dim)
    present_v = query.new_zeros(batch, kv_num_heads, length, dim)
    present_k[:, :, : past_key.shape[2]] = past_key
    present_v[:, :, : past_value.shape[2]] = past_value
    q = query.view(batch, seq, num_heads, dim).transpose(1, 2)
    k = key.view(batch, seq, kv_num_heads, dim).transpose(1, 2)
    v = value.view(batch, seq, kv_num_heads, dim).transpose(1, 2)
    out = query.new_zeros(batch, num_heads, seq, dim)
    for b in range(batch):
        keys = int(seqlens_k[b]) + 1
        start = 0 if seq == total else keys - seq
        pos = torch.arange(start, start + seq)
        cos, sin = cos_cache[pos], sin_cache[pos]
        present_k[b, :, start:start + seq] = _rotate(k[b], cos, sin)
        present_v[b, :, start:start + seq] = v[b]
        kb = present_k[b, :, :keys].repeat_interleave(num_heads // kv_num_heads, dim=0)
        vb = present_v[b, :, :keys].repeat_interleave(num_heads // kv_num_heads, dim=0)
        scores = _rotate(q[b], cos, sin) @ kb.transpose(-1, -2) * scale
        j = torch.arange(keys)
        visible = j[None, :] <= pos[:, None]
        if local_window_size >= 0:
            visible &= j[None, :] > pos[:, None] - local_window_size
        scores = scores.masked_fill(~visible, float("-inf"))
        if head_sink is not None:
            scores = torch.cat([scores, head_sink.view(-1, 1, 1).expand(-1, seq, 1).to(scores.dtype)], dim=-1)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)[..., :keys]
        out[b] = probs @ vb
    return out.transpose(1, 2).reshape(batch, seq, num_heads * dim), present_k, present_v


@gqa.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache, head_sink,
      num_heads, kv_num_heads, local_window_size, scale):
    # Traced with the past as the whole buffer (the runtime binds one buffer as past and present).
    out = query.new_empty(*query.shape[:2], num_heads * past_key.shape[-1])
    return out, torch.empty_like(past_key), torch.empty_like(past_value)


register_schemas()
_GQA = osv.Op(osv.Opset(DOMAIN, OPSET_VERSION), "GroupQueryAttention")


def _gqa_to_onnx(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
                 head_sink, num_heads, kv_num_heads, local_window_size, scale):
    return _GQA(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
                None, None, head_sink, num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale,
                local_window_size=local_window_size, do_rotary=1, _num_outputs=3)


ONNX_TRANSLATION = {torch.ops.moerun.gqa.default: _gqa_to_onnx}
