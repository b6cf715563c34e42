"""Token generation on an exported decoder: left padding, KV cache through IO binding, greedy and sampling."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from .buffers import bind_host_output, device_buffer, output_spec, to_device
from .checks import check_count, is_number
from .errors import MoerunError, RequestError
from .manifest import LOGITS_POSITION, Manifest, decoder_io_names
from .search import _top_k as top_k

__all__ = ["DecoderRunner", "GenerationStats", "SamplingConfig", "filter_logits", "left_pad", "pick_next",
           "right_pad", "trim_at_eos"]


@dataclass(frozen=True)
class SamplingConfig:
    """Greedy when do_sample is False; otherwise temperature, then top-k, then top-p (as transformers)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise RequestError(f"do_sample must be True or False, got {self.do_sample!r}")
        if not is_number(self.temperature) or self.temperature <= 0:
            raise RequestError(f"temperature must be a number > 0, got {self.temperature!r}")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        check_count(self.top_k, "top_k", minimum=0)
        if self.seed is not None:
            check_count(self.seed, "seed", minimum=0)


@dataclass
class GenerationStats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), each (batch, longest), padded on the left."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise MoerunError("every prompt must have at least one token")
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = seq
        mask[row, width - len(seq):] = 1
    return ids, mask


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), each (batch, longest), padded on the right (encoder inputs)."""
    ids, mask = left_pad([list(s)[::-1] for s in sequences], pad_id)
    return np.ascontiguousarray(ids[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])


def filter_logits(logits: np.ndarray, sampling: SamplingConfig) -> np.ndarray:
    """Temperature, then top-k, then top-p (as transformers' warpers), in float32: removed tokens get -inf."""
    ids, scores = _candidates(logits, sampling)
    out = np.full(logits.shape, -np.inf, dtype=np.float32)
    np.put_along_axis(out, ids, scores, axis=-1)
    return out


def _largest(scores: np.ndarray, n: int) -> np.ndarray:
    """Column indices of the n largest values of each row, in no particular order."""
    width = scores.shape[-1]
    if n >= width:
        return np.broadcast_to(np.arange(width), scores.shape)
    if n <= 256:  # beam search's sampled top-k: 1.5-7x faster than a partition of a large vocabulary for a few
        return top_k(scores, n)
    return np.argpartition(scores, width - n, axis=-1)[:, width - n:]


def _candidates(logits: np.ndarray, sampling: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, scores), each (batch, n): the tokens that temperature, top-k and top-p can keep, with their
    scores (-inf for those the filters remove). Only the candidates are sorted, never the whole vocabulary."""
    scores = logits.astype(np.float32) / np.float32(sampling.temperature)
    vocab = scores.shape[-1]
    ids = np.broadcast_to(np.arange(vocab), scores.shape)
    if 0 < sampling.top_k < vocab:
        top = _largest(scores, sampling.top_k)
        top_scores = np.take_along_axis(scores, top, axis=-1)
        kth = top_scores.min(axis=-1, keepdims=True)
        if ((scores >= kth).sum(axis=-1) == sampling.top_k).all():
            ids, scores = top, top_scores
        else:  # ties at the k-th score: TopKLogitsWarper keeps every tied token
            scores = np.where(scores < kth, -np.inf, scores)
    if sampling.top_p < 1.0:
        return _top_p(ids, scores, sampling.top_p)
    return ids, scores


_TOP_P_FIRST = 64  # candidates first tried for top-p; grown 8x until they hold top_p of the probability


def _top_p(ids: np.ndarray, scores: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """TopPLogitsWarper on candidates: a token stays while the probability of the tokens ranked above it is below
    top_p; ranked by score, the higher id first among equal scores (transformers sorts ascending, stably).
    Returns the (sorted) few candidates that decide it, the removed ones at -inf."""
    high = scores.max(axis=-1, keepdims=True)
    total = np.exp(scores - high).sum(axis=-1, keepdims=True, dtype=np.float64)
    n = min(_TOP_P_FIRST, scores.shape[-1])
    while True:
        pick = _largest(scores, n)
        top_ids, top_scores = np.take_along_axis(ids, pick, axis=-1), np.take_along_axis(scores, pick, axis=-1)
        order = np.lexsort((-top_ids, -top_scores), axis=-1)
        top_ids, top_scores = np.take_along_axis(top_ids, order, axis=-1), np.take_along_axis(top_scores, order, -1)
        # float64 on the few candidates: the boundary falls where transformers puts it
        top_probs = np.exp(top_scores.astype(np.float64) - high) / total
        above = np.cumsum(top_probs, axis=-1) - top_probs
        # Tokens outside these n are removed when the n hold top_p and none outside ties with the last of them.
        settled = (above[:, -1] + top_probs[:, -1] >= top_p) & ((scores >= top_scores[:, -1:]).sum(axis=-1) == n)
        if n == scores.shape[-1] or settled.all():
            return top_ids, np.where(above < top_p, top_scores, -np.inf)
        n = min(8 * n, scores.shape[-1])


def pick_next(logits: np.ndarray, sampling: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """Next token per row from last-position logits (batch, vocab): argmax, or a draw from the filtered softmax."""
    if not sampling.do_sample:
        return logits.argmax(axis=-1)
    ids, scores = _candidates(logits, sampling)
    cumulative = np.exp(scores - scores.max(axis=-1, keepdims=True)).cumsum(axis=-1)  # unnormalised: scaled below
    draws = rng.random((logits.shape[0], 1)) * cumulative[:, -1:]
    picked = (cumulative < draws).sum(axis=-1).clip(max=ids.shape[-1] - 1)
    return np.take_along_axis(ids, picked[:, None], axis=-1)[:, 0]


class DecoderRunner:
    """Runs the decoder graph step by step; KV-cache tensors stay as OrtValues on the device.

    Traced-attention graphs take left-padded batches with position_ids, and return presents one
    step longer than the past: each step's presents are bound as the next step's pasts where they
    lie (the graph itself concatenates, so each step still copies the cache once inside ONNX
    Runtime). Fused-attention graphs (GroupQueryAttention) take right-padded batches; their KV
    cache is one buffer per tensor, allocated once on the device for the whole generation and
    bound as both past and present, so ONNX Runtime appends to it in place.

    Logits land in host arrays that ONNX Runtime writes (copies from the device, on CUDA). A prefill asks the graph
    for each row's last position only (``logits_position``), where the graph takes it.
    """

    def __init__(self, session: ort.InferenceSession, manifest: Manifest, device: str) -> None:
        self.session = session
        self.manifest = manifest
        self.device = device
        inputs, outputs = decoder_io_names(manifest.num_layers, state_layers=manifest.state_layers())
        # past_key_values.{i}.key/value, and for hybrid models' stateful layers past.{i}.{state} (fixed size)
        self.past_names = [n for n in inputs if n.startswith("past")]
        self.present_names = outputs[1:]
        self.kv_dtype = np.float16 if manifest.dtype == "fp16" else np.float32
        self.logits_dtype, self.vocab = output_spec(session, "logits", manifest.vocab_size)
        # graphs converted since 2026-12 take each row's logits position (the prefill computes the LM head once per
        # row instead of at every prompt position); older ones return every position
        self.picks_position = LOGITS_POSITION in {i.name for i in session.get_overridable_initializers()}

    def bind_logits(self, binding: ort.IOBinding, positions: np.ndarray, width: int) -> np.ndarray:
        """Binds the logits output of a run over ``width`` columns for the rows' ``positions`` (batch,); returns the
        host array ONNX Runtime writes: (batch, 1, vocab) when the graph picks them, else (batch, width, vocab)."""
        if self.picks_position:  # bound as an OrtValue: bind_cpu_input finds no overridable initializer (ORT 1.31)
            value = ort.OrtValue.ortvalue_from_shape_and_type((len(positions),), np.int64)  # owns its memory
            value.update_inplace(np.ascontiguousarray(positions, dtype=np.int64))
            binding.bind_ortvalue_input(LOGITS_POSITION, value)
            width = 1
        return bind_host_output(binding, "logits", (len(positions), width, self.vocab), self.logits_dtype)

    def last_logits(self, logits: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """(batch, vocab) at ``positions`` from what bind_logits returned (a copy: that array can go)."""
        return logits[:, 0].copy() if self.picks_position else logits[np.arange(len(positions)), positions]

    def kv_buffer(self, shape: tuple[int, ...]) -> ort.OrtValue:
        return device_buffer(shape, self.kv_dtype, self.device)

    def empty_past(self, batch: int, length: int = 0) -> list[ort.OrtValue]:
        """KV buffers of ``length`` positions, and zero states (what a stateful layer starts from: zeroed even on
        CUDA, where device_buffer leaves memory uninitialised)."""
        return [to_device(np.zeros(shape, self.kv_dtype), self.device) if name.startswith("past.") else
                self.kv_buffer(shape)
                for name, shape in zip(self.past_names, self.manifest.past_shapes(batch, length))]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             past: list[ort.OrtValue], last_only: bool = False) -> tuple[np.ndarray, list[ort.OrtValue]]:
        """One forward of a traced-attention graph: (logits (batch, seq, vocab), presents one step longer).
        ``last_only``: the logits of the last column only, (batch, vocab)."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        for name, value in zip(self.past_names, past):
            binding.bind_ortvalue_input(name, value)
        batch, width = input_ids.shape
        if last_only:
            last = np.full(batch, width - 1)
            logits = self.bind_logits(binding, last, width)
        else:
            logits = bind_host_output(binding, "logits", (batch, width, self.vocab), self.logits_dtype)
        for name in self.present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return (self.last_logits(logits, last) if last_only else logits), list(binding.get_outputs()[1:])

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingConfig,
                 eos_token_ids: list[int], pad_token_id: int,
                 pickers: list | None = None) -> tuple[list[list[int]], GenerationStats]:
        """New tokens per prompt, each ending at (and including) its first EOS token.

        ``pickers``: a runtime.logits.TokenPicker per prompt (penalties, logit_bias, a grammar, logprobs), which
        then picks each row's tokens (in row order, from its own generator); a row whose grammar is complete ends.
        ``decode_tokens`` in the stats counts the tokens the decode steps really generated: a row that has
        finished is still computed (the batch keeps its shape) but counts no more."""
        if max_new_tokens < 1:
            raise MoerunError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        rng = np.random.default_rng(sampling.seed)
        batch = len(prompts)
        eos = np.array(eos_token_ids or [-1], dtype=np.int64)
        finished = np.zeros(batch, dtype=bool)
        generated = np.full((batch, max_new_tokens), pad_token_id, dtype=np.int64)
        ends = np.full(batch, max_new_tokens)  # where rows ended other than at EOS
        stats = GenerationStats()
        start = time.perf_counter()
        run = self._fused_steps if self.manifest.fused_attention else self._traced_steps
        steps = run(prompts, pad_token_id, max_new_tokens, stats)
        logits = next(steps)
        stats.prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        for t in range(max_new_tokens):
            # per-step Python stays small beside the graph: no copy of float32 logits, and a comparison with the
            # few EOS ids instead of np.isin (measured: 74 us of Python per decode step, ~0.5% of a GPT-OSS step)
            if pickers is None:
                picked = pick_next(logits.astype(np.float32, copy=False), sampling, rng)
            else:
                picked = np.array([pad_token_id if done else picker.pick(row).token
                                   for picker, row, done in zip(pickers, logits, finished)])
            token = np.where(finished, pad_token_id, picked)
            generated[:, t] = token
            finished |= (token[:, None] == eos).any(axis=-1)
            if pickers is not None:  # a row whose grammar is complete ends here
                ended = ~finished & [picker.done for picker in pickers]
                ends[ended] = t + 1
                finished |= ended
            if finished.all() or t == max_new_tokens - 1:
                break
            logits = steps.send(token[:, None])
            stats.decode_tokens += int(batch - finished.sum())
        stats.decode_s = time.perf_counter() - start
        return [trim_at_eos(row[:end], eos) for row, end in zip(generated.tolist(), ends)], stats

    def _traced_steps(self, prompts, pad_token_id, max_new_tokens, stats):
        """A generator: yields last-position logits (batch, vocab), is sent the next tokens (batch, 1)."""
        input_ids, mask = left_pad(prompts, pad_token_id)
        stats.prefill_tokens = int(mask.sum())
        batch, width = mask.shape
        positions = np.where(mask == 1, mask.cumsum(-1) - 1, 0)
        last, past = self.step(input_ids, mask, positions, self.empty_past(batch), last_only=True)
        tokens = yield last
        full_mask = np.ones((batch, width + max_new_tokens), dtype=np.int64)
        full_mask[:, :width] = mask
        next_pos = mask.sum(-1, keepdims=True)
        for t in range(1, max_new_tokens):
            logits, past = self.step(tokens, full_mask[:, : width + t], next_pos, past)
            next_pos = next_pos + 1
            tokens = yield logits[:, -1]

    def _fused_steps(self, prompts, pad_token_id, max_new_tokens, stats):
        """As _traced_steps, on right-padded rows and KV buffers sized once for the whole generation.

        One IO binding serves every step: the KV buffers are bound once as both past and present, and
        the decode logits land in one preallocated host array; a step rebinds only its two inputs.
        """
        input_ids, mask = right_pad(prompts, pad_token_id)
        stats.prefill_tokens = int(mask.sum())
        batch, width = mask.shape
        rows = np.arange(batch)
        lengths = mask.sum(-1)
        past = self.empty_past(batch, width + max_new_tokens)
        full_mask = np.zeros((batch, width + max_new_tokens), dtype=np.int64)
        full_mask[:, :width] = mask
        binding = self.session.io_binding()
        logits = self.bind_logits(binding, lengths - 1, width)
        for past_name, present_name, value in zip(self.past_names, self.present_names, past):
            binding.bind_ortvalue_input(past_name, value)
            binding.bind_ortvalue_output(present_name, value)
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", mask)
        self.session.run_with_iobinding(binding)
        last = self.last_logits(logits, lengths - 1)
        step_logits = self.bind_logits(binding, np.zeros(batch, dtype=np.int64), 1)  # a step's one column
        del logits
        tokens = yield last
        for _ in range(max_new_tokens - 1):
            full_mask[rows, lengths] = 1  # each row's next token goes right after its own last one
            lengths += 1
            binding.bind_cpu_input("input_ids", np.ascontiguousarray(tokens, dtype=np.int64))
            binding.bind_cpu_input("attention_mask", np.ascontiguousarray(full_mask[:, : lengths.max()]))
            self.session.run_with_iobinding(binding)
            tokens = yield step_logits[:, -1]


def trim_at_eos(row: list[int], eos) -> list[int]:
    """``row`` up to and including its first token in ``eos`` (any container of ids)."""
    for i, token in enumerate(row):
        if token in eos:
            return row[: i + 1]
    return row
