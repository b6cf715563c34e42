"""Token generation on an exported decoder: left padding, KV cache through IO binding, greedy and sampling."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from .errors import MoerunError
from .manifest import Manifest

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
        if self.temperature <= 0:
            raise MoerunError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MoerunError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise MoerunError(f"top_k must be >= 0, got {self.top_k}")


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
    """Temperature, then top-k, then top-p (as transformers' warpers): removed tokens get -inf."""
    scores = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k and sampling.top_k < scores.shape[-1]:
        kth = np.partition(scores, -sampling.top_k, axis=-1)[:, -sampling.top_k, None]
        scores = np.where(scores < kth, -np.inf, scores)
    if sampling.top_p < 1.0:
        order = np.argsort(scores, axis=-1, kind="stable")  # ascending, as TopPLogitsWarper
        sorted_scores = np.take_along_axis(scores, order, axis=-1)
        probs = _softmax(sorted_scores)
        remove = np.cumsum(probs, axis=-1) <= 1 - sampling.top_p
        remove[:, -1] = False  # always keep the most likely token
        sorted_scores[remove] = -np.inf
        np.put_along_axis(scores, order, sorted_scores, axis=-1)
    return scores


def _softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def pick_next(logits: np.ndarray, sampling: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """Next token per row from last-position logits (batch, vocab): argmax, or a draw from the filtered softmax."""
    if not sampling.do_sample:
        return logits.argmax(axis=-1)
    cumulative = _softmax(filter_logits(logits, sampling)).cumsum(axis=-1)
    draws = rng.random((logits.shape[0], 1)) * cumulative[:, -1:]
    return (cumulative < draws).sum(axis=-1).clip(max=logits.shape[-1] - 1)


class DecoderRunner:
    """Runs the decoder graph step by step; KV-cache tensors stay as OrtValues on the device.

    Traced-attention graphs take left-padded batches with position_ids, and return presents one
    step longer than the past. Fused-attention graphs (GroupQueryAttention) take right-padded
    batches; their KV cache is one buffer per tensor, allocated once for the whole generation and
    bound as both past and present, so ONNX Runtime appends to it in place.
    """

    def __init__(self, session: ort.InferenceSession, manifest: Manifest, device: str) -> None:
        self.session = session
        self.manifest = manifest
        self.device = device
        self.past_names = [n for n in manifest.inputs if n.startswith("past_key_values.")]
        self.present_names = manifest.outputs[1:]
        self.kv_dtype = np.float16 if manifest.dtype == "fp16" else np.float32

    def empty_past(self, batch: int, length: int = 0) -> list[ort.OrtValue]:
        return [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=self.kv_dtype), self.device, 0)
                for shape in self.manifest.past_shapes(batch, length)]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             past: list[ort.OrtValue]) -> tuple[np.ndarray, list[ort.OrtValue]]:
        """One forward of a traced-attention graph: (logits (batch, seq, vocab), presents one step longer)."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        for name, value in zip(self.past_names, past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", self.device)
        for name in self.present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), list(outputs[1:])

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingConfig,
                 eos_token_ids: list[int], pad_token_id: int) -> tuple[list[list[int]], GenerationStats]:
        """New tokens per prompt, each ending at (and including) its first EOS token."""
        if max_new_tokens < 1:
            raise MoerunError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        rng = np.random.default_rng(sampling.seed)
        batch = len(prompts)
        eos = np.array(eos_token_ids or [-1], dtype=np.int64)
        finished = np.zeros(batch, dtype=bool)
        generated = np.full((batch, max_new_tokens), pad_token_id, dtype=np.int64)
        stats = GenerationStats()
        start = time.perf_counter()
        run = self._fused_steps if self.manifest.fused_attention else self._traced_steps
        steps = run(prompts, pad_token_id, max_new_tokens, stats)
        logits = next(steps)
        stats.prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        for t in range(max_new_tokens):
            token = np.where(finished, pad_token_id, pick_next(logits.astype(np.float32), sampling, rng))
            generated[:, t] = token
            finished |= np.isin(token, eos)
            if finished.all() or t == max_new_tokens - 1:
                break
            logits = steps.send(token[:, None])
            stats.decode_tokens += batch
        stats.decode_s = time.perf_counter() - start
        return [trim_at_eos(row, eos) for row in generated.tolist()], stats

    def _traced_steps(self, prompts, pad_token_id, max_new_tokens, stats):
        """A generator: yields last-position logits (batch, vocab), is sent the next tokens (batch, 1)."""
        input_ids, mask = left_pad(prompts, pad_token_id)
        stats.prefill_tokens = int(mask.sum())
        batch = len(prompts)
        positions = np.where(mask == 1, mask.cumsum(-1) - 1, 0)
        logits, past = self.step(input_ids, mask, positions, self.empty_past(batch))
        tokens = yield logits[:, -1]
        next_pos = mask.sum(-1, keepdims=True)
        for _ in range(max_new_tokens - 1):
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            logits, past = self.step(tokens, mask, next_pos, past)
            next_pos = next_pos + 1
            tokens = yield logits[:, -1]

    def _fused_steps(self, prompts, pad_token_id, max_new_tokens, stats):
        """As _traced_steps, on right-padded rows and KV buffers sized once for the whole generation.

        One IO binding serves every step: the KV buffers are bound once as both past and present, and
        on CPU the decode logits land in one preallocated array; a step rebinds only its two inputs.
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
        binding.bind_output("logits", self.device)  # first: get_outputs() lists outputs as bound
        for past_name, present_name, value in zip(self.past_names, self.present_names, past):
            binding.bind_ortvalue_input(past_name, value)
            binding.bind_ortvalue_output(present_name, value)
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", mask)
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        tokens = yield logits[rows, lengths - 1]
        step_logits = None
        if self.device == "cpu":  # ONNX Runtime writes straight into this array
            step_logits = np.empty((batch, 1, logits.shape[-1]), dtype=logits.dtype)
            binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(step_logits))
        for _ in range(max_new_tokens - 1):
            full_mask[rows, lengths] = 1  # each row's next token goes right after its own last one
            lengths += 1
            binding.bind_cpu_input("input_ids", np.ascontiguousarray(tokens, dtype=np.int64))
            binding.bind_cpu_input("attention_mask", np.ascontiguousarray(full_mask[:, : lengths.max()]))
            self.session.run_with_iobinding(binding)
            logits = step_logits if step_logits is not None else binding.get_outputs()[0].numpy()
            tokens = yield logits[:, -1]


def trim_at_eos(row: list[int], eos) -> list[int]:
    """``row`` up to and including its first token in ``eos`` (any container of ids)."""
    for i, token in enumerate(row):
        if token in eos:
            return row[: i + 1]
    return row
