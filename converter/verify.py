"""--verify: Hugging Face PyTorch against the exported ONNX model on the same seeded inputs.

The reference is computed from the original model before its MoE blocks are swapped, so one copy
of the weights is in memory at a time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..runtime import MoEModel
from ..runtime.errors import VerificationError
from ..runtime.generation import trim_at_eos as _trim

__all__ = ["DEFAULT_TOLERANCE", "Reference", "Seq2SeqReference", "VerifyReport", "compare", "compare_seq2seq",
           "reference", "reference_seq2seq", "sample_prompts"]

DEFAULT_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}
GREEDY_TOKENS = 20
# Greedy tokens of the runtime's generation loop (KV cache updated in place, padding) against greedy decoding
# by re-running the whole sequence each step: the same graph, so only a broken loop can disagree (a near-tie
# flipped by the cached path's different summation order is allowed for).
MIN_LOOP_AGREEMENT = 0.95
# Greedy tokens against PyTorch's generate, enforced for unquantized exports (quantized ones are reported).
MIN_AGREEMENT = {"fp32": 0.9, "fp16": 0.5}


def sample_prompts(vocab_size: int, seed: int = 0, lengths: tuple[int, ...] = (9, 5, 7)) -> list[list[int]]:
    """Seeded random prompts of different lengths (padding is exercised)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, n).tolist() for n in lengths]


def padded(prompts: list[list[int]], pad_id: int, right: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, position_ids) as the runtime builds them: left-padded, or right-padded
    for fused-attention models (their positions are 0, 1, ... from the left)."""
    from ..runtime.generation import left_pad, right_pad

    if right:
        ids, mask = right_pad(prompts, pad_id)
        return ids, mask, np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
    ids, mask = left_pad(prompts, pad_id)
    return ids, mask, np.where(mask == 1, mask.cumsum(-1) - 1, 0)


@dataclass
class Reference:
    prompts: list[list[int]]
    pad_id: int
    right_padded: bool
    split: int
    prefill_logits: np.ndarray
    decode_logits: np.ndarray
    greedy: list[list[int]]
    new_tokens: int


@dataclass
class VerifyReport:
    max_abs_prefill: float
    max_abs_decode: float
    greedy_agreement: float  # with PyTorch's generate
    greedy_tokens: int
    tolerance: float | None  # None: logits reported only (quantized models)
    loop_agreement: float = 1.0  # the generation loop against greedy by full re-runs of the same graph
    min_agreement: float | None = None  # enforced greedy agreement with PyTorch (None: reported only)

    @property
    def max_abs(self) -> float:
        return max(self.max_abs_prefill, self.max_abs_decode)

    @property
    def passed(self) -> bool:
        return ((self.tolerance is None or self.max_abs <= self.tolerance)
                and self.loop_agreement >= MIN_LOOP_AGREEMENT
                and (self.min_agreement is None or self.greedy_agreement >= self.min_agreement))

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


@torch.no_grad()
def reference(model, eos_ids: list[int], pad_id: int, seed: int = 0, new_tokens: int = GREEDY_TOKENS,
              right_padded: bool = False) -> Reference:
    """Logits (prefill, and decode with past) and greedy tokens of the original PyTorch model, on
    batches padded as the exported model's runtime pads them."""
    prompts = sample_prompts(model.config.vocab_size, seed)
    ids, mask, pos = (torch.from_numpy(a) for a in padded(prompts, pad_id, right_padded))
    full = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    split = ids.shape[1] - 2
    first = model(input_ids=ids[:, :split], attention_mask=mask[:, :split], position_ids=pos[:, :split], use_cache=True)
    step = model(input_ids=ids[:, split:], attention_mask=mask, position_ids=pos[:, split:],
                 cache=first.cache, use_cache=True).logits
    ids, mask, _ = (torch.from_numpy(a) for a in padded(prompts, pad_id))  # generate pads on the left
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         num_beams=1, pad_token_id=pad_id, eos_token_id=eos_ids or None)
    greedy = [_trim(row, set(eos_ids)) for row in out[:, ids.shape[1]:].tolist()]
    return Reference(prompts, pad_id, right_padded, split, full.float().numpy(), step.float().numpy(), greedy,
                     new_tokens)


def compare(onnx_model: MoEModel, ref: Reference, tolerance: float | None) -> VerifyReport:
    """Run the ONNX model on the reference's inputs; max abs logit error at real (unpadded) positions."""
    ids, mask, pos = padded(ref.prompts, ref.pad_id, ref.right_padded)
    valid = mask.astype(bool)
    full, _ = onnx_model.forward(ids, mask, pos)
    _, past = onnx_model.forward(ids[:, : ref.split], mask[:, : ref.split], pos[:, : ref.split])
    if ref.right_padded:  # GroupQueryAttention takes several new tokens with a past only at batch 1
        steps = []
        for i in range(ref.split, ids.shape[1]):
            logits, past = onnx_model.forward(ids[:, i:i + 1], mask[:, : i + 1], None, past=past)
            steps.append(logits)
        step = np.concatenate(steps, axis=1)
    else:
        step, _ = onnx_model.forward(ids[:, ref.split:], mask, pos[:, ref.split:], past=past)
    full, step = full.astype(np.float32), step.astype(np.float32)
    prefill_err = float(np.abs(full - ref.prefill_logits)[valid].max())
    decode_err = float(np.abs(step - ref.decode_logits)[valid[:, ref.split:]].max())
    ours = onnx_model.generate_ids(ref.prompts, max_new_tokens=ref.new_tokens)
    rerun = greedy_by_rerunning(onnx_model, ref.prompts, ref.new_tokens, ref.pad_id, ref.right_padded)
    agreement, total = _agreement(ref.greedy, ours)
    return VerifyReport(prefill_err, decode_err, agreement, total, tolerance, _agreement(rerun, ours)[0])


def _agreement(expected: list[list[int]], got: list[list[int]]) -> tuple[float, int]:
    """Share of positions where two batches of token rows agree (rows of different lengths: the longer counts)."""
    total = sum(max(len(a), len(b)) for a, b in zip(expected, got))
    same = sum(x == y for a, b in zip(expected, got) for x, y in zip(a, b))
    return (same / total if total else 1.0), total


def greedy_by_rerunning(onnx_model: MoEModel, prompts: list[list[int]], new_tokens: int, pad_id: int,
                        right_padded: bool) -> list[list[int]]:
    """Greedy decoding without the generation loop: every step runs the whole sequences through ``forward``
    (no KV cache) and takes the argmax at each row's last position; rows stop at EOS as generate's do."""
    eos = set(onnx_model.manifest.eos_token_id)
    rows, out = [list(p) for p in prompts], [[] for _ in prompts]
    for _ in range(new_tokens):
        live = [b for b, row in enumerate(out) if not (row and row[-1] in eos)]
        if not live:
            break
        ids, mask, pos = padded([rows[b] for b in live], pad_id, right_padded)
        logits, _ = onnx_model.forward(ids, mask, pos)
        for i, b in enumerate(live):
            last = len(rows[b]) - 1 if right_padded else ids.shape[1] - 1
            token = int(logits[i, last].argmax())
            rows[b].append(token)
            out[b].append(token)
    return out


@dataclass
class Seq2SeqReference:
    sources: list[list[int]]
    targets: np.ndarray        # (batch, length) teacher-forced decoder inputs, start token first
    split: int
    encoder: np.ndarray
    logits: np.ndarray
    greedy: list[list[int]]
    new_tokens: int


def _sources(model, eos_ids: list[int], seed: int) -> list[list[int]]:
    vocab = model.config.vocab_size
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() + eos_ids[:1] for n in (9, 5, 7)]


@torch.no_grad()
def reference_seq2seq(model, eos_ids: list[int], pad_id: int, start_id: int, seed: int = 0,
                      new_tokens: int = GREEDY_TOKENS) -> Seq2SeqReference:
    """Encoder output, teacher-forced decoder logits and greedy generations of the PyTorch model."""
    from ..runtime.generation import right_pad

    sources = _sources(model, eos_ids, seed)
    ids, mask = (torch.from_numpy(a) for a in right_pad(sources, pad_id))
    rng = np.random.default_rng(seed + 1)
    targets = np.concatenate([np.full((len(sources), 1), start_id),
                              rng.integers(3, model.config.vocab_size, (len(sources), 5))], axis=1)
    encoder = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.from_numpy(targets)).logits
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         num_beams=1, pad_token_id=pad_id, eos_token_id=eos_ids or None)
    greedy = [_trim(row, set(eos_ids)) for row in out[:, 1:].tolist()]
    return Seq2SeqReference(sources, targets, 4, encoder.float().numpy(), logits.float().numpy(), greedy, new_tokens)


def compare_seq2seq(onnx_model: MoEModel, ref: Seq2SeqReference, tolerance: float | None) -> VerifyReport:
    """Encoder output (real positions), decoder logits (prefill, then steps with past) and greedy tokens."""
    encoded = onnx_model.encode(ref.sources)
    valid = encoded.attention_mask.astype(bool)
    encoder_err = float(np.abs(encoded.hidden_states.astype(np.float32) - ref.encoder)[valid].max())
    runner = onnx_model.runner
    past = runner.empty_past(len(ref.sources))
    prefill, past = runner.decode(ref.targets[:, : ref.split], encoded.attention_mask, past, encoded.cross)
    steps = []
    for t in range(ref.split, ref.targets.shape[1]):
        logits, past = runner.decode(ref.targets[:, t: t + 1], encoded.attention_mask, past, encoded.cross)
        steps.append(logits)
    prefill_err = float(np.abs(prefill.astype(np.float32) - ref.logits[:, : ref.split]).max())
    decode_err = float(np.abs(np.concatenate(steps, 1).astype(np.float32) - ref.logits[:, ref.split:]).max())
    ours = onnx_model.translate_ids(ref.sources, max_new_tokens=ref.new_tokens)
    ours = [_trim(row[1:], set(onnx_model.manifest.eos_token_id)) for row in ours]
    agreement, total = _agreement(ref.greedy, ours)
    return VerifyReport(max(encoder_err, prefill_err), decode_err, agreement, total, tolerance)


def check(report: VerifyReport) -> None:
    """Raise VerificationError naming what failed: logits over tolerance, the generation loop disagreeing
    with the graph it runs, or greedy tokens disagreeing with PyTorch."""
    if report.tolerance is not None and report.max_abs > report.tolerance:
        raise VerificationError(
            f"ONNX logits differ from PyTorch by {report.max_abs:.3g} (tolerance {report.tolerance:g}); "
            f"greedy agreement {report.greedy_agreement:.1%}"
        )
    if report.loop_agreement < MIN_LOOP_AGREEMENT:
        raise VerificationError(
            f"the generation loop's greedy tokens agree with the graph's own (re-run per step) on only "
            f"{report.loop_agreement:.1%} (needs {MIN_LOOP_AGREEMENT:.0%}): the runtime's KV cache or padding is wrong"
        )
    if report.min_agreement is not None and report.greedy_agreement < report.min_agreement:
        raise VerificationError(
            f"greedy tokens agree with PyTorch on only {report.greedy_agreement:.1%} of {report.greedy_tokens} "
            f"(needs {report.min_agreement:.0%}), although logits are within {report.tolerance:g}"
        )
