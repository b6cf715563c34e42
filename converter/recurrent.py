"""Hybrid decoders: layers that carry fixed-size state (short convolutions, Mamba) instead of a KV cache.

The family's adapter swaps each stateful module for one that reads its past state from, and writes its
present state to, the ``StateStep`` the wrapper fills before each forward; attention layers keep their KV
cache as ``DecoderWithCache`` passes it. The graph takes every state as an input (zeros at prefill) and
returns it updated, beside the KV cache: onnxruntime-genai's contract for its hybrid models
(``past.{i}.conv`` / ``present.{i}.conv``, ``past.{i}.recurrent`` / ``present.{i}.recurrent``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from ..runtime.manifest import state_layers

__all__ = ["DecoderWithState", "StateStep", "hold_on_padding"]


@dataclass
class StateStep:
    """What the stateful layers read and write during one forward (set by the wrapper before the call).

    ``attention_mask`` is the graph's 2-D mask (batch, past + new): layers zero their padded positions
    before updating state, as transformers does (``apply_mask_to_padding_states``)."""

    attention_mask: torch.Tensor | None = None
    past: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    present: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def new_tokens_mask(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch, seq, 1) in the hidden states' dtype: 1 on real tokens of this forward, 0 on padding."""
        seq = hidden_states.shape[1]
        return self.attention_mask[:, -seq:, None].to(hidden_states.dtype)

    def new_tokens(self, seq: int) -> torch.Tensor:
        """(batch, seq) bool: True on the real tokens of this forward's ``seq`` new positions. (narrow, not a slice:
        its length is ``seq`` by construction, which torch.export needs to scan it beside the tokens.)"""
        return self.attention_mask.narrow(1, self.attention_mask.shape[1] - seq, seq) != 0

    def conv_state(self, window: torch.Tensor, width: int) -> torch.Tensor:
        """A causal convolution's present state from its window [past (width) | new inputs (seq)] (batch, channels,
        width + seq): the ``width`` columns ending at each row's last real input. With left padding (moerun's) that
        is the window's last columns; with right padding (onnxruntime-genai's batches) the window ends in padding,
        which must not displace the prompt's last inputs. A row whose new positions are all padding keeps its past.
        Integer column arithmetic, so that the index stays exact in fp16 graphs."""
        seq = window.shape[-1] - width
        columns = torch.arange(width, width + seq, device=window.device)
        last = torch.where(self.new_tokens(seq), columns, width - 1).amax(-1)  # (batch,): the last real column
        index = last[:, None] + torch.arange(1 - width, 1, device=window.device)  # (batch, width)
        return window.gather(2, index[:, None, :].expand(-1, window.shape[1], -1))


def hold_on_padding(real: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """One scan step's state: ``new`` on rows whose token is real, ``old`` on padding (real: (batch,) bool), so that
    padding after a prompt (right padding) neither decays nor updates the recurrent state."""
    return torch.where(real.reshape(-1, *[1] * (new.dim() - 1)), new, old)


class DecoderWithState(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *presents), where past and presents
    are, layer by layer (``decoder_io_names`` order), key and value of attention layers and the states of
    stateful ones."""

    def __init__(self, model: nn.Module, adapter) -> None:
        super().__init__()
        self.model = model
        config = model.config
        self.num_layers = config.num_hidden_layers
        self.state_layers = state_layers(adapter.layer_types(config), adapter.state_shapes(config))
        self.step = StateStep()
        adapter.swap_state_layers(model, self.step)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        s = self.step
        s.attention_mask, s.past, s.present = attention_mask, {}, {}
        # a cache laid out by the config's layer types: masks find the first attention layer by it
        cache = DynamicCache(config=self.model.config)
        inputs = iter(past)
        for i in range(self.num_layers):
            if i in self.state_layers:
                s.past[i] = {name: next(inputs) for name in self.state_layers[i]}
            else:
                cache.update(next(inputs), next(inputs), i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        presents = []
        for i in range(self.num_layers):
            if i in self.state_layers:
                presents += [s.present[i][name] for name in self.state_layers[i]]
            else:
                presents += [out.cache.layers[i].keys, out.cache.layers[i].values]
        return (out.logits, *presents)
