"""Encoder-decoder generation on two ONNX graphs: encode once, then decode step by step.

The decoder is driven by ``runtime.search`` through one callable, ``step(rows, tokens)``: ``rows``
indexes the rows of the previous step, which both reorders beams and drops finished sentences
(batch pruning), so every tensor of the decoding state is gathered by one index array.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .manifest import Manifest, seq2seq_io_names

__all__ = ["EncoderOutput", "Seq2SeqRunner"]


@dataclass
class EncoderOutput:
    hidden_states: np.ndarray        # (batch, source_length, d_model)
    cross: list[np.ndarray]          # per decoder layer: key, value (batch, heads, source_length, head_dim)
    attention_mask: np.ndarray       # (batch, source_length) int64


class _DecodeState:
    """The decoder's state across search steps; ``__call__`` is the ``step`` the search drives."""

    def __init__(self, runner: Seq2SeqRunner, encoded: EncoderOutput) -> None:
        self.runner = runner
        self.encoded = encoded
        self.entries: np.ndarray | None = None   # batch entry of each live row
        self.cross: list[np.ndarray] = []
        self.mask: np.ndarray | None = None
        self.past: list[np.ndarray] = []
        self.rows_computed = 0
        self.steps = 0
        self.seconds = 0.0

    def __call__(self, rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        rows = np.asarray(rows, dtype=np.int64)
        if self.entries is None:  # first step: rows index batch entries
            entries = rows
            self.past = self.runner.empty_past(len(rows))
        else:
            entries = self.entries[rows]
            if len(rows) != len(self.entries) or not np.array_equal(rows, np.arange(len(rows))):
                self.past = [p.take(rows, axis=0) for p in self.past]
        if self.entries is None or not np.array_equal(entries, self.entries):
            # Beams of one sentence share its source: gather cross K/V only when sentences leave.
            self.cross = [c.take(entries, axis=0) for c in self.encoded.cross]
            self.mask = self.encoded.attention_mask.take(entries, axis=0)
        self.entries = entries
        logits, self.past = self.runner.decode(np.ascontiguousarray(tokens, dtype=np.int64), self.mask,
                                               self.past, self.cross)
        self.rows_computed += len(rows)
        self.steps += 1
        self.seconds += time.perf_counter() - start
        return logits[:, -1, :].astype(np.float32, copy=False)


class Seq2SeqRunner:
    """Runs the encoder graph once per batch and the decoder graph once per step."""

    def __init__(self, encoder: ort.InferenceSession, decoder: ort.InferenceSession, manifest: Manifest) -> None:
        self.encoder, self.decoder, self.manifest = encoder, decoder, manifest
        names = seq2seq_io_names(manifest.num_layers)
        self.encoder_outputs = names["encoder"][1]
        self.decoder_inputs, self.decoder_outputs = names["decoder"]
        n = 2 * manifest.num_layers
        self.past_names = self.decoder_inputs[2: 2 + n]
        self.cross_names = self.decoder_inputs[2 + n:]
        self.kv_dtype = np.float16 if manifest.dtype == "fp16" else np.float32

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> EncoderOutput:
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        attention_mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        hidden, *cross = self.encoder.run(self.encoder_outputs, {"input_ids": input_ids,
                                                                 "attention_mask": attention_mask})
        return EncoderOutput(hidden, cross, attention_mask)

    def empty_past(self, rows: int) -> list[np.ndarray]:
        return [np.zeros(shape, dtype=self.kv_dtype) for shape in self.manifest.past_shapes(rows)]

    def decode(self, input_ids: np.ndarray, encoder_attention_mask: np.ndarray, past: list[np.ndarray],
               cross: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder call: (logits (rows, length, vocab), the self-attention presents)."""
        feeds = {"input_ids": input_ids, "encoder_attention_mask": encoder_attention_mask}
        feeds.update(zip(self.past_names, past))
        feeds.update(zip(self.cross_names, cross))
        logits, *presents = self.decoder.run(self.decoder_outputs, feeds)
        return logits, presents

    def start(self, encoded: EncoderOutput) -> _DecodeState:
        """A fresh decoding state for ``encoded``: the ``step`` callable of runtime.search."""
        return _DecodeState(self, encoded)
