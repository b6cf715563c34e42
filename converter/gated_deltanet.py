"""Gated DeltaNet (Qwen3-Next, Qwen3.5-MoE linear attention) with its convolution and recurrent states as graph I/O.

transformers computes the layer in two ways: prefill runs the chunked gated delta rule (a faster algorithm for
many tokens), decode the recurrent one, token by token, updating the cache in place. Both compute the same
recurrence. Here the recurrent form is the one code path for every length: a ``scan`` over time
(``torch._higher_order_ops.scan``), which torch.onnx exports as one ONNX ``Scan`` node with a dynamic
sequence length and ONNX Runtime runs exactly (docs/design.md). Its initial state is ``past.{i}.recurrent``
(zeros at prefill), its final state ``present.{i}.recurrent``. The causal convolution in front is LFM2's
pattern: [past inputs | new inputs] convolved without padding, its state the last kernel - 1 real inputs
(``past.{i}.conv``), as onnxruntime-genai keeps it.

Written by hand: no library exports the gated delta rule to ONNX (transformers' functions loop in Python
over a length known at trace time and write the cache in place).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch._higher_order_ops.scan import scan
from transformers.activations import ACT2FN

from .recurrent import StateStep, hold_on_padding

__all__ = ["StatefulGatedDeltaNet", "gated_delta_rule", "state_shapes"]


def state_shapes(config) -> dict[str, list[int]]:
    """A Gated DeltaNet layer's states without the batch dimension: the convolution's last kernel - 1 inputs
    (q, k and v channels) and the recurrent state (value heads, key head dim, value head dim)."""
    key_dim = config.linear_num_key_heads * config.linear_key_head_dim
    value_dim = config.linear_num_value_heads * config.linear_value_head_dim
    return {"conv": [2 * key_dim + value_dim, config.linear_conv_kernel_dim - 1],
            "recurrent": [config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim]}


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """transformers' (and the FLA library's) l2norm: x * rsqrt(sum(x^2) + eps)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor, state: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``torch_recurrent_gated_delta_rule`` (query/key l2-normalised in the kernel) as a scan over
    time, for any number of tokens. query, key (batch, seq, key heads, dk); value (batch, seq, value heads, dv);
    g, beta (batch, seq, value heads); state (batch, value heads, dk, dv); real (batch, seq) bool, False on
    padding, where the state is left as it was. Returns the output (batch, seq, value heads, dv) in the query's
    dtype and the final state (float32)."""
    dtype = query.dtype
    groups = value.shape[2] // key.shape[2]
    if groups != 1:  # each query/key head serves `groups` consecutive value heads
        query, key = query.repeat_interleave(groups, dim=2), key.repeat_interleave(groups, dim=2)
    query, key, value, g, beta = (x.float() for x in (query, key, value, g, beta))
    query = _l2norm(query) / (query.shape[-1] ** 0.5)
    key = _l2norm(key)

    def step(old, xs):
        q, k, v, g_t, b_t, real_t = xs  # one token: (batch, heads, d), (batch, heads) and (batch,)
        s = old * g_t.exp()[..., None, None]
        delta = (v - (s * k[..., None]).sum(-2)) * b_t[..., None]
        s = s + k[..., None] * delta[..., None, :]
        # a new tensor, not the input: scan forbids an output aliasing an input
        return hold_on_padding(real_t, s, old), (s * q[..., None]).sum(-2)

    final, out = scan(step, state.float(), [x.movedim(1, 0) for x in (query, key, value, g, beta, real)])
    return out.movedim(0, 1).to(dtype), final


class StatefulGatedDeltaNet(nn.Module):
    """Qwen3NextGatedDeltaNet / Qwen3_5MoeGatedDeltaNet with its states as graph I/O, one code path for prefill
    and decode. Padded positions are zeroed before the projections, as transformers does
    (``apply_mask_to_padding_states``): with left padding the state stays zero until the first real token. Right
    padding (onnxruntime-genai's batches) leaves both states as the row's last real token left them."""

    def __init__(self, layer: nn.Module, step: StateStep) -> None:
        super().__init__()
        self.layer = layer  # its projections, convolution weight, A_log, dt_bias, gated norm
        self.layer_idx = layer.layer_idx
        self.width = layer.conv_kernel_size - 1
        self.act = ACT2FN[layer.activation]
        self.step = step

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(q | k | v channels (batch, seq, conv_dim), z (batch, seq, v heads, dv), b, a (batch, seq, v heads))."""
        layer = self.layer
        if hasattr(layer, "in_proj_qkvz"):  # Qwen3-Next: q, k, v, z (and b, a) interleaved per key-head group
            q, k, v, z, b, a = layer.fix_query_key_value_ordering(layer.in_proj_qkvz(x), layer.in_proj_ba(x))
            qkv = torch.cat([t.reshape(t.shape[0], t.shape[1], -1) for t in (q, k, v)], dim=-1)
            return qkv, z, b, a
        z = layer.in_proj_z(x)  # Qwen3.5: one projection each
        return (layer.in_proj_qkv(x), z.reshape(*z.shape[:2], -1, layer.head_v_dim), layer.in_proj_b(x),
                layer.in_proj_a(x))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        s, layer = self.step, self.layer
        batch, seq = hidden_states.shape[:2]
        hidden_states = hidden_states * s.new_tokens_mask(hidden_states)  # padding never reaches the state
        qkv, z, b, a = self._project(hidden_states)
        past = s.past[self.layer_idx]
        window = torch.cat([past["conv"], qkv.transpose(1, 2)], dim=-1)  # (batch, conv_dim, K - 1 + seq)
        conv = F.conv1d(window, layer.conv1d.weight, layer.conv1d.bias, groups=layer.conv_dim)[:, :, -seq:]
        qkv = self.act(conv).transpose(1, 2)
        query, key, value = torch.split(qkv, [layer.key_dim, layer.key_dim, layer.value_dim], dim=-1)
        query = query.reshape(batch, seq, -1, layer.head_k_dim)
        key = key.reshape(batch, seq, -1, layer.head_k_dim)
        value = value.reshape(batch, seq, -1, layer.head_v_dim)
        beta = b.sigmoid()
        g = -layer.A_log.float().exp() * F.softplus(a.float() + layer.dt_bias)
        out, recurrent = gated_delta_rule(query, key, value, g, beta, past["recurrent"], s.new_tokens(seq))
        s.present[self.layer_idx] = {"conv": s.conv_state(window, self.width),
                                     "recurrent": recurrent.to(past["recurrent"].dtype)}
        out = layer.norm(out.reshape(-1, out.shape[-1]), z.reshape(-1, z.shape[-1]))
        return layer.out_proj(out.reshape(batch, seq, -1))
