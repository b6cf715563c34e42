"""A sequence's logits between the model and its next token: OpenAI's penalties and logit_bias, a grammar's token
mask, then greedy or sampling (``pick_next``); and the log-probabilities of that same, processed, distribution.

Penalties follow their definitions: repetition_penalty as transformers' RepetitionPenaltyLogitsProcessor (prompt and
output tokens: a positive logit divided by it, a negative one multiplied), presence and frequency penalties as
OpenAI documents them (output tokens: minus presence once per seen token, minus frequency per occurrence), then
logit_bias added, then the grammar's mask (disallowed tokens -inf).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .checks import check_count, is_number
from .errors import RequestError
from .generation import SamplingConfig, pick_next

__all__ = ["LogitsOptions", "Pick", "TokenPicker"]


@dataclass(frozen=True)
class LogitsOptions:
    """What a request asks of its logits besides temperature/top-k/top-p (SamplingConfig)."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: and the k most likely

    def __post_init__(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not is_number(value) or not -2 <= value <= 2:
                raise RequestError(f"{name} must be a number in [-2, 2], got {value!r}")
        if not is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise RequestError(f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}")
        if any(not is_number(v) or not -100 <= v <= 100 for v in self.logit_bias.values()):
            raise RequestError("logit_bias values must be numbers in [-100, 100]")
        if self.logprobs is not None:
            check_count(self.logprobs, "logprobs", minimum=0)

    @property
    def plain(self) -> bool:
        """Nothing to do to the logits and nothing to report: the batched fast path applies."""
        return (self.presence_penalty == 0 and self.frequency_penalty == 0 and self.repetition_penalty == 1
                and not self.logit_bias and self.logprobs is None)


@dataclass
class Pick:
    """A chosen token and, when asked, its log-probability and the ``top`` most likely (token, logprob), best
    first, all from the distribution it was picked from."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


class TokenPicker:
    """One sequence's token choice, step after step: its options, its grammar (a GrammarMatcher or None), its random
    generator, and the tokens it has seen (for the penalties)."""

    def __init__(self, sampling: SamplingConfig, options: LogitsOptions | None = None, grammar=None,
                 rng: np.random.Generator | None = None, prompt: list[int] = ()) -> None:
        self.sampling = sampling
        self.options = options or LogitsOptions()
        self.grammar = grammar
        self.rng = rng if rng is not None else np.random.default_rng(sampling.seed)
        self._prompt = set(prompt) if self.options.repetition_penalty != 1 else set()
        self._output: Counter[int] = Counter()
        self.picks: list[Pick] = []  # with logprobs: every Pick so far

    def process(self, logits: np.ndarray) -> np.ndarray:
        """The row's logits (vocab,) after penalties, bias and the grammar's mask, float32 (a copy)."""
        out = np.array(logits, dtype=np.float32)
        opt = self.options
        if opt.repetition_penalty != 1:
            seen = np.fromiter(self._prompt | set(self._output), dtype=np.int64)
            if seen.size:
                values = out[seen]
                out[seen] = np.where(values > 0, values / opt.repetition_penalty, values * opt.repetition_penalty)
        if self._output and (opt.presence_penalty or opt.frequency_penalty):
            ids = np.fromiter(self._output, dtype=np.int64, count=len(self._output))
            counts = np.fromiter(self._output.values(), dtype=np.float32, count=len(self._output))
            out[ids] -= opt.presence_penalty + opt.frequency_penalty * counts
        for token, bias in opt.logit_bias.items():
            if 0 <= token < out.shape[-1]:
                out[token] += bias
        if self.grammar is not None:
            out[~self.grammar.allowed()] = -np.inf
        return out

    def pick(self, logits: np.ndarray) -> Pick:
        """The next token from the row's logits (vocab,); the grammar and the penalties are told of it."""
        processed = self.process(logits)
        token = int(pick_next(processed[None], self.sampling, self.rng)[0])
        pick = Pick(token)
        if self.options.logprobs is not None:
            high = processed.max()
            logprobs = processed - (high + np.log(np.exp(processed - high, dtype=np.float64).sum()))
            pick.logprob = float(logprobs[token])
            k = min(self.options.logprobs, processed.shape[-1])
            if k:
                top = np.argpartition(-logprobs, k - 1)[:k]
                top = top[np.lexsort((top, -logprobs[top]))]
                pick.top = [(int(t), float(logprobs[t])) for t in top]
            self.picks.append(pick)
        self.accept(token)
        return pick

    def accept(self, token: int) -> None:
        self._output[token] += 1
        if self.grammar is not None:
            self.grammar.consume(token)

    @property
    def done(self) -> bool:
        """The grammar is complete: the sequence must end."""
        return self.grammar is not None and self.grammar.done

    @property
    def plain(self) -> bool:
        return self.grammar is None and self.options.plain
