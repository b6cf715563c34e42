"""Trace an encoder-decoder MoE model into two ONNX graphs: an encoder and a decoder with KV cache.

encoder(input_ids, attention_mask) -> encoder_hidden_states, present_key_cross.{i}, present_value_cross.{i}
decoder(input_ids, encoder_attention_mask, past_key_self.{i}, past_value_self.{i},
        past_key_cross.{i}, past_value_cross.{i}) -> logits, present_key_self.{i}, present_value_self.{i}

The cross-attention keys and values depend only on the source, so the encoder graph computes them
once and the decoder reuses them every step (Hugging Face's EncoderDecoderCache with every layer
marked updated). Each MoE block has already been swapped for ``FusedMoE``.
"""

from __future__ import annotations

import onnx_ir as ir
import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import MoEModelOutput

from ..runtime.manifest import seq2seq_io_names
from .export import KVShape, trace

__all__ = ["DecoderStep", "EncoderWithCrossKV", "export_seq2seq"]

# Sample sizes for tracing: distinct and > 1 so that no dimension is specialised to a constant.
_BATCH, _SOURCE, _TARGET, _PAST = 2, 7, 3, 5


class EncoderWithCrossKV(nn.Module):
    """forward(input_ids, attention_mask) -> (encoder_hidden_states, k0, v0, k1, v1, ...)."""

    def __init__(self, model: nn.Module, cross: list) -> None:
        super().__init__()
        self.encoder = model.get_encoder()
        self.cross = cross
        # The cross-attention projections are the decoder's layers' weights: named "decoder.layers.N" so that
        # WeightStream finds them in the checkpoint's decoder layer group N.
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList([nn.ModuleList([c.key, c.value]) for c in cross])

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        kv = []
        for c in self.cross:
            kv += c.keys_values(hidden)
        return (hidden, *kv)


class DecoderStep(nn.Module):
    """forward(input_ids, encoder_attention_mask, *self_kv, *cross_kv) -> (logits, *present_self_kv)."""

    def __init__(self, model: nn.Module, num_layers: int) -> None:
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.d_model = model.config.d_model

    def forward(self, input_ids, encoder_attention_mask, *past):
        n = self.num_layers
        self_kv, cross_kv = past[: 2 * n], past[2 * n:]
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        for i in range(n):
            cache.self_attention_cache.update(self_kv[2 * i], self_kv[2 * i + 1], i)
            cache.cross_attention_cache.update(cross_kv[2 * i], cross_kv[2 * i + 1], i)
            cache.is_updated[i] = True
        # The decoder reads only the shape of encoder_hidden_states once the cross cache is filled.
        k0 = cross_kv[0]
        encoder_hidden_states = k0.new_zeros((k0.shape[0], k0.shape[2], self.d_model))
        out = self.model(
            encoder_outputs=MoEModelOutput(last_hidden_state=encoder_hidden_states),
            attention_mask=encoder_attention_mask,
            decoder_input_ids=input_ids,
            cache=cache,
            use_cache=True,
        )
        presents = []
        for layer in out.cache.self_attention_cache.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def _name_dims(model: ir.Model, names: dict[str, tuple]) -> None:
    for value in [*model.graph.inputs, *model.graph.outputs]:
        dims = names.get(value.name)
        if dims is None or value.shape is None:
            continue
        value.shape = ir.Shape([ir.SymbolicDim(d) if d is not None else old for old, d in zip(value.shape, dims)])


def export_seq2seq(encoder_module: EncoderWithCrossKV, decoder_module: DecoderStep,
                   kv: KVShape) -> tuple[ir.Model, ir.Model]:
    """(encoder, decoder) ONNX models of an encoder-decoder whose MoE blocks are already fused."""
    model, num_layers = decoder_module.model, decoder_module.num_layers
    config = model.config
    dtype = next(model.parameters()).dtype
    names = seq2seq_io_names(num_layers)
    g = torch.Generator().manual_seed(0)
    batch, source = torch.export.Dim("batch"), torch.export.Dim("source")
    target, past = torch.export.Dim("target"), torch.export.Dim("past")

    src_ids = torch.randint(3, config.vocab_size, (_BATCH, _SOURCE), generator=g)
    src_mask = torch.ones(_BATCH, _SOURCE, dtype=torch.int64)
    src_mask[1, -2:] = 0
    encoder = trace(encoder_module, (src_ids, src_mask), *names["encoder"],
                    ({0: batch, 1: source}, {0: batch, 1: source}), "the encoder")

    tgt_ids = torch.randint(3, config.vocab_size, (_BATCH, _TARGET), generator=g)
    self_kv = tuple(torch.randn(_BATCH, kv.heads, _PAST, d, generator=g).to(dtype)
                    for _ in range(num_layers) for d in (kv.key_dim, kv.value_dim))
    cross_kv = tuple(torch.randn(_BATCH, kv.heads, _SOURCE, d, generator=g).to(dtype)
                     for _ in range(num_layers) for d in (kv.key_dim, kv.value_dim))
    dyn = ({0: batch, 1: target}, {0: batch, 1: source},
           tuple({0: batch, 2: past} for _ in self_kv) + tuple({0: batch, 2: source} for _ in cross_kv))
    decoder = trace(decoder_module, (tgt_ids, src_mask, *self_kv, *cross_kv),
                    *names["decoder"], dyn, "the decoder")

    dims = {"input_ids": ("batch_size", "source_length"), "attention_mask": ("batch_size", "source_length"),
            "encoder_hidden_states": ("batch_size", "source_length", None)}
    for name in names["encoder"][1][1:]:
        dims[name] = ("batch_size", None, "source_length", None)
    _name_dims(encoder, dims)
    dims = {"input_ids": ("batch_size", "sequence_length"),
            "encoder_attention_mask": ("batch_size", "source_length"),
            "logits": ("batch_size", "sequence_length", None)}
    for name in names["decoder"][0][2:]:
        dims[name] = ("batch_size", None, "past_sequence_length" if "self" in name else "source_length", None)
    for name in names["decoder"][1][1:]:
        dims[name] = ("batch_size", None, "total_sequence_length", None)
    _name_dims(decoder, dims)
    return encoder, decoder
