"""Encoder-decoder generation on two ONNX graphs: encode once, then decode step by step.

The decoder is driven by ``runtime.search`` through one callable, ``step(rows, tokens)``: ``rows``
indexes the rows of the previous step, which both reorders beams and drops finished sentences
(batch pruning), so every tensor of the decoding state is gathered by one index array.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .buffers import bind_host_output, bind_input, device_buffer, output_spec, to_device
from .errors import RequestCancelledError
from .manifest import Manifest, seq2seq_io_names

__all__ = ["EncoderOutput", "Seq2SeqRunner"]


@dataclass
class EncoderOutput:
    hidden_states: np.ndarray        # (batch, source_length, d_model)
    cross: list[np.ndarray]          # per decoder layer: key, value (batch, heads, source_length, head_dim), host
    attention_mask: np.ndarray       # (batch, source_length) int64


class _DecodeState:
    """The decoder's state across search steps; ``__call__`` is the ``step`` the search drives.

    The self-attention cache stays where ONNX Runtime wrote it: each step's presents are bound as the next step's
    pasts. Rows are gathered only when the search reorders or drops them (beam search, batch pruning); the cross
    keys and values are uploaded once, and again only when sentences leave the batch.
    """

    def __init__(self, runner: Seq2SeqRunner, encoded: EncoderOutput,
                 should_stop: Callable[[], bool] | None = None) -> None:
        self.runner = runner
        self.should_stop = should_stop  # asked before each step: True ends the search (RequestCancelledError)
        self.encoded = encoded
        self.entries: np.ndarray | None = None   # batch entry of each live row
        self.cross: list[ort.OrtValue] = []      # on the runner's device
        self.mask: np.ndarray | None = None
        self.past: list[ort.OrtValue] = []       # on the runner's device
        self.rows_computed = 0
        self.steps = 0
        self.seconds = 0.0

    def __call__(self, rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        if self.should_stop is not None and self.should_stop():
            raise RequestCancelledError("the translation was stopped before it finished")
        start = time.perf_counter()
        rows = np.asarray(rows, dtype=np.int64)
        if self.entries is None:  # first step: rows index batch entries
            entries = rows
            self.past = self.runner.empty_past(len(rows))
        else:
            entries = self.entries[rows]
            if len(rows) != len(self.entries) or not np.array_equal(rows, np.arange(len(rows))):
                self.past = self.runner.gather(self.past, rows)
        if self.entries is None or not np.array_equal(entries, self.entries):
            # Beams of one sentence share its source: gather cross K/V only when sentences leave.
            device = self.runner.device
            self.cross = [to_device(c.take(entries, axis=0), device) for c in self.encoded.cross]
            self.mask = self.encoded.attention_mask.take(entries, axis=0)
        self.entries = entries
        logits, self.past = self.runner.decode(tokens, self.mask, self.past, self.cross)
        self.rows_computed += len(rows)
        self.steps += 1
        self.seconds += time.perf_counter() - start
        return logits[:, -1, :].astype(np.float32, copy=False)


class Seq2SeqRunner:
    """Runs the encoder graph once per batch and the decoder graph once per step, with IO binding: the decoder's
    caches stay on ``device`` ("cpu" or "cuda"; CUDA untested by the test suite, see scripts/check_cuda.py)."""

    def __init__(self, encoder: ort.InferenceSession, decoder: ort.InferenceSession, manifest: Manifest,
                 device: str = "cpu") -> None:
        self.encoder, self.decoder, self.manifest, self.device = encoder, decoder, manifest, device
        names = seq2seq_io_names(manifest.num_layers)
        self.encoder_outputs = names["encoder"][1]
        self.decoder_inputs, self.decoder_outputs = names["decoder"]
        n = 2 * manifest.num_layers
        self.past_names = self.decoder_inputs[2: 2 + n]
        self.cross_names = self.decoder_inputs[2 + n:]
        self.kv_dtype = np.float16 if manifest.dtype == "fp16" else np.float32
        self.logits_dtype, self.vocab = output_spec(decoder, "logits", manifest.vocab_size)

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> EncoderOutput:
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        attention_mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        hidden, *cross = self.encoder.run(self.encoder_outputs, {"input_ids": input_ids,
                                                                 "attention_mask": attention_mask})
        return EncoderOutput(hidden, cross, attention_mask)

    def empty_past(self, rows: int) -> list[ort.OrtValue]:
        return [device_buffer(shape, self.kv_dtype, self.device) for shape in self.manifest.past_shapes(rows)]

    def gather(self, past: list[ort.OrtValue], rows: np.ndarray) -> list[ort.OrtValue]:
        """The rows ``rows`` of every cache tensor. On the CPU a NumPy take on ONNX Runtime's own buffers; on CUDA
        through the host (the graph has no gather input), only on the steps that reorder or drop rows."""
        return [to_device(value.numpy().take(rows, axis=0), self.device) for value in past]

    def decode(self, input_ids: np.ndarray, encoder_attention_mask: np.ndarray, past: list,
               cross: list) -> tuple[np.ndarray, list[ort.OrtValue]]:
        """One decoder call: (logits (rows, length, vocab) on the host, the self-attention presents as OrtValues on
        the device). ``past`` and ``cross`` may be OrtValues (bound where they lie) or host arrays."""
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        binding = self.decoder.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("encoder_attention_mask", np.ascontiguousarray(encoder_attention_mask, dtype=np.int64))
        for name, value in zip(self.past_names, past):
            bind_input(binding, name, value)
        for name, value in zip(self.cross_names, cross):
            bind_input(binding, name, value)
        logits = bind_host_output(binding, "logits", (*input_ids.shape, self.vocab), self.logits_dtype)
        for name in self.decoder_outputs[1:]:
            binding.bind_output(name, self.device)
        self.decoder.run_with_iobinding(binding)
        return logits, list(binding.get_outputs()[1:])

    def start(self, encoded: EncoderOutput, should_stop: Callable[[], bool] | None = None) -> _DecodeState:
        """A fresh decoding state for ``encoded``: the ``step`` callable of runtime.search."""
        return _DecodeState(self, encoded, should_stop)
