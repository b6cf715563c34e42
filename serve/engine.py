"""The model side of the scheduler: prefill a request into a slot, then decode every busy slot in one run.

Two engines with one interface. ``SlotEngine`` (fused-attention graphs, GroupQueryAttention) holds the KV cache
of every request in preallocated slot rows, so requests join and leave a running batch without copying caches.
``GroupEngine`` (traced-attention graphs, whose presents grow by concatenation and cannot share slot buffers, and
hybrid graphs with recurrent state) runs the requests that arrive together as one batch; later ones wait for it.
"""

from __future__ import annotations

import ctypes

import numpy as np
import onnxruntime as ort

from ..runtime.buffers import bind_host_output
from ..runtime.generation import DecoderRunner, GenerationStats, right_pad

__all__ = ["GroupEngine", "SlotEngine", "make_engine"]


class SlotEngine:
    """Continuous batching on a fused-attention decoder.

    Per KV tensor one buffer of shape (max_batch, kv_heads, max_len, head_dim) is allocated once on the session's
    device; request ``slot`` owns row ``slot``. GroupQueryAttention takes right-padded rows and appends each row's
    new key and value in place at that row's own length (the attention mask's row sum), with the buffer bound as
    both past and present. A joining request is prefilled into its own row (the row's address bound as a batch-1
    buffer), and requests joining together in consecutive slots in one run, right-padded. A decode step runs once
    over rows [0, highest busy slot], free rows fed a pad token at length 1 (written to their own free row, never
    read).
    """

    batching = "continuous"
    joins_running = True

    def __init__(self, runner: DecoderRunner, max_batch: int, max_len: int, pad_token_id: int) -> None:
        self.runner, self.max_batch, self.max_len, self.pad = runner, max_batch, max_len, pad_token_id
        self.buffers = runner.empty_past(max_batch, max_len)
        self.shapes = runner.manifest.past_shapes(max_batch, max_len)
        itemsize = np.dtype(runner.kv_dtype).itemsize
        self.row_bytes = [int(np.prod(shape[1:])) * itemsize for shape in self.shapes]
        self.lengths = np.zeros(max_batch, dtype=np.int64)  # tokens in each slot's cache; 0: free
        self._decode_binding: tuple[int, ort.IOBinding, np.ndarray] | None = None

    def _bind_rows(self, binding: ort.IOBinding, first: int, rows: int) -> None:
        """Rows [first, first + rows) of every KV buffer, bound in place as both past and present."""
        device = self.runner.device
        for past, present, buf, shape, row_bytes in zip(self.runner.past_names, self.runner.present_names,
                                                       self.buffers, self.shapes, self.row_bytes):
            address = buf.data_ptr() + first * row_bytes
            view = [rows, *shape[1:]]
            binding.bind_input(past, device, 0, self.runner.kv_dtype, view, address)
            binding.bind_output(present, device, 0, self.runner.kv_dtype, view, address)

    def prefill(self, first: int, prompts: list[list[int]], max_tokens: list[int]) -> np.ndarray:
        """Runs ``prompts`` into slots first, first + 1, ... (right-padded, one run); returns each one's
        last-position logits (len(prompts), vocab)."""
        ids, mask = right_pad(prompts, self.pad)
        rows, width = ids.shape
        binding = self.runner.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        self._bind_rows(binding, first, rows)
        lengths = mask.sum(-1)
        logits = self.runner.bind_logits(binding, lengths - 1, width)
        self.runner.session.run_with_iobinding(binding)
        self.lengths[first: first + rows] = lengths
        return self.runner.last_logits(logits, lengths - 1)

    def decode(self, tokens: dict[int, int]) -> np.ndarray:
        """One step for every busy slot (slot -> its last token); logits (rows, vocab), row = slot."""
        rows = max(tokens) + 1
        ids = np.full((rows, 1), self.pad, dtype=np.int64)
        busy = np.fromiter(tokens, dtype=np.int64, count=len(tokens))
        ids[busy, 0] = list(tokens.values())
        self.lengths[busy] += 1
        lengths = np.where(self.lengths[:rows] > 0, self.lengths[:rows], 1)
        mask = (np.arange(int(lengths.max())) < lengths[:, None]).astype(np.int64)
        if self._decode_binding is None or self._decode_binding[0] != rows:
            binding = self.runner.session.io_binding()
            self._bind_rows(binding, 0, rows)
            logits = bind_host_output(binding, "logits", (rows, 1, self.runner.vocab), self.runner.logits_dtype)
            self._decode_binding = (rows, binding, logits)
        _, binding, logits = self._decode_binding
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        self.runner.session.run_with_iobinding(binding)
        return logits[:, -1]

    def copy_slot(self, source: int, target: int) -> None:
        """Slot ``source``'s KV cache into slot ``target`` (n choices of one prompt share its prefill)."""
        for buffer, row_bytes in zip(self.buffers, self.row_bytes):
            if self.runner.device == "cpu":
                base = buffer.data_ptr()
                ctypes.memmove(base + target * row_bytes, base + source * row_bytes, row_bytes)
            else:  # through the host (untested: the test suite has no GPU)
                host = buffer.numpy()
                host[target] = host[source]
                buffer.update_inplace(host)
        self.lengths[target] = self.lengths[source]

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0


class GroupEngine:
    """Static batching on traced-attention and recurrent-state decoders: the requests admitted together (the
    scheduler admits only while nothing runs: ``joins_running`` False) are left-padded into one batch and run by the
    runner's own step loop, which carries the KV cache and any recurrent states; finished rows ride along fed a pad
    token (their logits are not read) until the last request of the group ends."""

    batching = "static: requests arriving together share a batch"
    joins_running = False

    def __init__(self, runner: DecoderRunner, max_batch: int, pad_token_id: int) -> None:
        self.runner, self.max_batch, self.pad = runner, max_batch, pad_token_id
        self._steps, self._rows, self._busy = None, 0, set()

    def prefill(self, first: int, prompts: list[list[int]], max_tokens: list[int]) -> np.ndarray:
        assert first == 0 and self._steps is None, "a group starts on an idle engine"
        self._steps = self.runner._traced_steps(prompts, self.pad, max(max_tokens), GenerationStats())
        self._rows, self._busy = len(prompts), set(range(len(prompts)))
        return next(self._steps)

    def decode(self, tokens: dict[int, int]) -> np.ndarray:
        ids = np.full((self._rows, 1), self.pad, dtype=np.int64)
        for slot, token in tokens.items():
            ids[slot, 0] = token
        return self._steps.send(ids)

    def release(self, slot: int) -> None:
        self._busy.discard(slot)
        if not self._busy and self._steps is not None:
            self._steps.close()
            self._steps = None


def make_engine(runner: DecoderRunner, max_batch: int, max_len: int, pad_token_id: int):
    """SlotEngine (continuous batching) for fused-attention graphs, GroupEngine (static batching) for traced ones
    and for graphs with recurrent state (slot rows hold KV caches only)."""
    if runner.manifest.fused_attention and not runner.manifest.states:
        return SlotEngine(runner, max_batch, max_len, pad_token_id)
    return GroupEngine(runner, max_batch, pad_token_id)
