"""Mamba mixers with their convolution and SSM states as graph I/O: Mamba-2 (Granite-MoE-hybrid) and Mamba-1 (Jamba).

transformers runs a Mamba layer two ways: a whole-sequence form at prefill (Mamba-2's chunked scan, Mamba-1's
loop over time) and a one-token recurrent form at decode, each updating its cache in place. A graph with a
dynamic sequence length follows neither, so both are written here as one code path for every length: the
causal depthwise convolution over [past inputs | new inputs] (as LFM2-MoE's short convolution), then the
selective-scan recurrence (the per-token form of transformers' decode step) as a ``scan`` over time starting
from the past SSM state. torch.onnx exports the scan as one ONNX ``Scan`` node over the dynamic length.

Written by hand because no library exports a Mamba layer with external state: mamba_ssm's and causal_conv1d's
kernels are CUDA-only and not traceable, and transformers' modules branch on the sequence length.

States (graph I/O, genai's names): ``conv``, the last ``d_conv - 1`` inputs of the convolution (transformers
caches ``d_conv``; the oldest never reaches an output, onnxruntime-genai's convolution states keep ``d_conv - 1``),
and ``recurrent``, the SSM state in transformers' layout ((heads, head_dim, d_state) for Mamba-2,
(intermediate, d_state) for Mamba-1). Padding is zeroed before the input projection and after the convolution,
where transformers zeroes it (``apply_mask_to_padding_states``), so left padding leaves the states as a prompt
without padding would; right padding (onnxruntime-genai's batches) leaves them as the row's last real token did
(the convolution state gathered at it, the scan holding its state on padded steps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch._higher_order_ops.scan import scan

from .recurrent import StateStep, hold_on_padding

__all__ = ["StatefulMamba1", "StatefulMamba2", "causal_conv_with_state"]


def causal_conv_with_state(conv: nn.Conv1d, past: torch.Tensor, x: torch.Tensor,
                           step: StateStep) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution of x (batch, channels, seq) continuing from ``past`` (batch, channels, k - 1):
    (output (batch, channels, seq) before the activation, the present state: the last k - 1 real inputs)."""
    window = torch.cat([past, x], dim=-1)
    out = F.conv1d(window, conv.weight, conv.bias, groups=conv.groups)  # no padding: the past is the padding
    return out, step.conv_state(window, conv.kernel_size[0] - 1)


def _mamba2_step(old: torch.Tensor, xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of Mamba-2: h = exp(dt A) h + (dt x) B^T, y = h C (state (b, heads, head_dim, d_state)); on
    padding h stays as it was."""
    decay, dt_x, b, c, real = xs  # (b, h), (b, h, p), (b, h, n), (b, h, n), (b,)
    state = old * decay[..., None, None] + dt_x[..., None] * b[:, :, None, :]
    # a new tensor, not the input: scan forbids a carry aliasing its input
    return hold_on_padding(real, state, old), (state * c[:, :, None, :]).sum(-1)


class StatefulMamba2(nn.Module):
    """GraniteMoeHybridMambaLayer (Mamba-2 with grouped B/C and a gated RMSNorm) with states as graph I/O.

    Keeps the module's parameter names (in_proj, conv1d, dt_bias, A_log, D, norm, out_proj): weights bind
    from the checkpoint by name."""

    def __init__(self, mixer: nn.Module, step: StateStep) -> None:
        super().__init__()
        self.in_proj, self.conv1d, self.norm, self.out_proj = mixer.in_proj, mixer.conv1d, mixer.norm, mixer.out_proj
        self.dt_bias, self.A_log, self.D = mixer.dt_bias, mixer.A_log, mixer.D
        self.act = mixer.act
        self.layer_idx = mixer.layer_idx
        self.heads, self.head_dim, self.groups = mixer.num_heads, mixer.head_dim, mixer.n_groups
        self.d_state, self.intermediate, self.conv_dim = mixer.ssm_state_size, mixer.intermediate_size, mixer.conv_dim
        self.dt_min, self.dt_max = mixer.time_step_limit or (0.0, float("inf"))
        self.step = step

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        s = self.step
        batch, seq, _ = hidden_states.shape
        mask = s.new_tokens_mask(hidden_states)
        past = s.past[self.layer_idx]
        gate, xbc, dt = self.in_proj(hidden_states * mask).split(
            [self.intermediate, self.conv_dim, self.heads], dim=-1)
        xbc, conv_state = causal_conv_with_state(self.conv1d, past["conv"], xbc.transpose(1, 2), s)
        xbc = self.act(xbc).transpose(1, 2) * mask
        x, b, c = xbc.split([self.intermediate, self.groups * self.d_state, self.groups * self.d_state], dim=-1)
        # the chunked prefill clamps dt to time_step_limit (a no-op at the default (0, inf)); decode does not
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(self.dt_min, self.dt_max)  # (b, t, h)
        decay = torch.exp(dt * -torch.exp(self.A_log.float()))
        x = x.float().reshape(batch, seq, self.heads, self.head_dim)
        per_group = self.heads // self.groups
        b, c = (t.float().reshape(batch, seq, self.groups, self.d_state).repeat_interleave(per_group, dim=2)
                for t in (b, c))
        xs = [t.transpose(0, 1) for t in (decay, dt[..., None] * x, b, c, s.new_tokens(seq))]  # time first
        recurrent, y = scan(_mamba2_step, past["recurrent"].float(), xs)  # in float32 as transformers' scan
        y = y.transpose(0, 1) + x * self.D.float()[:, None]
        s.present[self.layer_idx] = {"conv": conv_state, "recurrent": recurrent.to(hidden_states.dtype)}
        y = self.norm(y.reshape(batch, seq, self.intermediate), gate)
        return self.out_proj(y.to(hidden_states.dtype))


def _mamba1_step(old: torch.Tensor, xs: list[torch.Tensor], a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of Mamba-1: h = exp(dt A) h + (dt x) B^T, y = h C (state (b, intermediate, d_state), A (i, n));
    on padding h stays as it was."""
    dt, dt_x, b, c, real = xs  # (b, i), (b, i), (b, n), (b, n), (b,)
    state = torch.exp(dt[..., None] * a) * old + dt_x[..., None] * b[:, None, :]
    return hold_on_padding(real, state, old), (state * c[:, None, :]).sum(-1)


class StatefulMamba1(nn.Module):
    """JambaMambaMixer (Mamba-1 with RMSNorms on dt, B and C) with states as graph I/O.

    Keeps the module's parameter names (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj and the three norms)."""

    def __init__(self, mixer: nn.Module, step: StateStep) -> None:
        super().__init__()
        self.in_proj, self.conv1d, self.x_proj, self.dt_proj = mixer.in_proj, mixer.conv1d, mixer.x_proj, mixer.dt_proj
        self.out_proj, self.A_log, self.D = mixer.out_proj, mixer.A_log, mixer.D
        self.dt_layernorm, self.b_layernorm, self.c_layernorm = mixer.dt_layernorm, mixer.b_layernorm, mixer.c_layernorm
        self.act = mixer.act
        self.layer_idx = mixer.layer_idx
        self.rank, self.d_state = mixer.time_step_rank, mixer.ssm_state_size
        self.step = step

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        s = self.step
        mask = s.new_tokens_mask(hidden_states)
        past = s.past[self.layer_idx]
        x, gate = self.in_proj(hidden_states * mask).transpose(1, 2).chunk(2, dim=1)
        x, conv_state = causal_conv_with_state(self.conv1d, past["conv"], x, s)
        x = self.act(x).transpose(1, 2) * mask  # (b, t, i)
        dt, b, c = self.x_proj(x).split([self.rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(self.dt_layernorm(dt)).float())  # (b, t, i)
        b, c = self.b_layernorm(b).float(), self.c_layernorm(c).float()
        x = x.float()
        a = -torch.exp(self.A_log.float())
        xs = [t.transpose(0, 1) for t in (dt, dt * x, b, c, s.new_tokens(x.shape[1]))]  # time first
        recurrent, y = scan(lambda state, x: _mamba1_step(state, x, a), past["recurrent"].float(), xs)  # float32 too
        y = (y.transpose(0, 1) + x * self.D.float()) * F.silu(gate.transpose(1, 2).float())
        s.present[self.layer_idx] = {"conv": conv_state, "recurrent": recurrent.to(hidden_states.dtype)}
        return self.out_proj(y.to(hidden_states.dtype))
