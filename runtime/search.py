"""Greedy and beam search for encoder-decoder generation in NumPy, token-identical to transformers' `generate`.

The decoder is a callback `step(rows, tokens) -> logits`: `rows` picks, for every row of this call, the row of the
previous call whose state (KV cache, encoder output) it continues, so one gather does beam reordering and batch
pruning. Batch entries that can no longer change (greedy: emitted EOS; beam: transformers' done condition) leave the
batch when `SearchConfig.prune` is set, which changes how many rows the decoder computes but never the result.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import MoerunError

__all__ = ["SearchConfig", "SearchResult", "StepFn", "log_softmax", "search"]

log = logging.getLogger(__name__)

StepFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(rows (n,) int64 into the previous call's rows, tokens (n, t) int64) -> last-position logits (n, vocab)."""

_EXCLUDED = np.float32(-1.0e9)  # transformers' "very large negative" that keeps a beam from being chosen
_SAMPLE = 8192  # scores sampled per row to bound the top-k threshold on large vocabularies


@dataclass(frozen=True)
class SearchConfig:
    """The subset of transformers' GenerationConfig that greedy and beam search read, with the same meanings."""

    num_beams: int = 1
    max_length: int = 200  # total decoder length, start token(s) included
    max_new_tokens: int | None = None  # when set, max_length = start length + max_new_tokens
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never"
    no_repeat_ngram_size: int = 0
    num_return_sequences: int = 1
    prune: bool = True  # finished batch entries leave the batch

    def __post_init__(self) -> None:
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise MoerunError(f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise MoerunError(f"max_length must be an integer >= 1, got {self.max_length!r}")
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise MoerunError(f"max_new_tokens must be None or an integer >= 1, got {self.max_new_tokens!r}")
        if not math.isfinite(self.length_penalty):
            raise MoerunError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if self.early_stopping not in (True, False, "never") or not isinstance(self.early_stopping, (bool, str)):
            raise MoerunError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not isinstance(self.no_repeat_ngram_size, int) or self.no_repeat_ngram_size < 0:
            raise MoerunError(f"no_repeat_ngram_size must be an integer >= 0, got {self.no_repeat_ngram_size!r}")
        if not isinstance(self.num_return_sequences, int) or not 1 <= self.num_return_sequences <= self.num_beams:
            raise MoerunError(f"num_return_sequences must be between 1 and num_beams ({self.num_beams}), "
                              f"got {self.num_return_sequences!r}")


@dataclass
class SearchResult:
    sequences: np.ndarray  # (batch * num_return_sequences, L) int64: start token(s), generated tokens, padding
    scores: np.ndarray | None  # beam search: length-normalised sequence scores (HF's sequences_scores); greedy: None
    rows_computed: int  # rows the decoder was asked to compute, summed over step calls
    steps: int  # step calls


def search(step: StepFn, batch_size: int, start_ids: np.ndarray, *, eos_token_id: int | list[int],
           pad_token_id: int, config: SearchConfig, forced_bos_token_id: int | None = None) -> SearchResult:
    """Greedy (num_beams == 1) or beam search from the decoder prompt `start_ids` (batch, L0), as HF generate."""
    start = np.asarray(start_ids)
    if start.ndim != 2 or start.shape[0] != batch_size or start.shape[1] < 1 or batch_size < 1:
        raise MoerunError(f"start_ids must have shape (batch_size={batch_size}, >= 1), got {start.shape}")
    if not np.issubdtype(start.dtype, np.integer):
        raise MoerunError(f"start_ids must hold integer token ids, got dtype {start.dtype}")
    start = start.astype(np.int64)
    eos = np.atleast_1d(np.asarray([] if eos_token_id is None else eos_token_id, dtype=np.int64))
    prompt_len = start.shape[1]
    max_length = prompt_len + config.max_new_tokens if config.max_new_tokens is not None else config.max_length
    if max_length <= prompt_len:
        raise MoerunError(f"max_length ({max_length}) leaves no room to generate after the {prompt_len}-token decoder "
                          "prompt; raise max_length or set max_new_tokens")
    if config.num_beams == 1:
        return _greedy(step, start, eos, pad_token_id, max_length, config, forced_bos_token_id)
    return _beam(step, start, eos, pad_token_id, max_length, config, forced_bos_token_id)


def _call(step: StepFn, rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    logits = np.asarray(step(rows, np.ascontiguousarray(tokens, dtype=np.int64)))
    if logits.ndim != 2 or logits.shape[0] != len(rows):
        raise MoerunError(f"the decoder step must return logits of shape ({len(rows)}, vocab), got {logits.shape}")
    return logits.astype(np.float32, copy=False)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """In the logits' precision and in torch's order of operations: (x - max) - log(sum(exp(x - max)))."""
    out = logits - logits.max(axis=-1, keepdims=True)
    out -= np.log(np.exp(out).sum(axis=-1, keepdims=True))
    return out


def _ban_repeated_ngrams(scores: np.ndarray, history: np.ndarray, ngram: int) -> np.ndarray:
    """HF's NoRepeatNGramLogitsProcessor: a token that would repeat an ngram of the row's history gets -inf."""
    cur_len = history.shape[1]
    if cur_len < ngram:
        return scores
    windows = np.lib.stride_tricks.sliding_window_view(history, ngram, axis=1)  # (rows, cur_len-ngram+1, ngram)
    prefix = history[:, cur_len + 1 - ngram:]
    row, window = np.nonzero((windows[:, :, :-1] == prefix[:, None, :]).all(axis=-1))
    banned = windows[row, window, -1]
    inside = (banned >= 0) & (banned < scores.shape[1])
    scores = scores.copy()
    scores[row[inside], banned[inside]] = -np.inf
    return scores


def _process(scores: np.ndarray, cur_len: int, history: np.ndarray | None, config: SearchConfig,
             forced_bos: int | None) -> np.ndarray:
    """HF's logits processors in HF's order: no-repeat-ngram (on the (rows, cur_len) history), then forced BOS."""
    if config.no_repeat_ngram_size:
        scores = _ban_repeated_ngrams(scores, history, config.no_repeat_ngram_size)
    if forced_bos is not None and cur_len == 1:  # HF forces BOS only after a one-token decoder prompt
        if not 0 <= forced_bos < scores.shape[1]:
            raise MoerunError(f"forced_bos_token_id {forced_bos} is outside the vocabulary of {scores.shape[1]}")
        scores = np.full_like(scores, -np.inf)
        scores[:, forced_bos] = 0.0
    return scores


def _greedy(step: StepFn, start: np.ndarray, eos: np.ndarray, pad: int, max_length: int, config: SearchConfig,
            forced_bos: int | None) -> SearchResult:
    batch, cur_len = start.shape
    sequences = np.full((batch, max_length), pad, dtype=np.int64)
    sequences[:, :cur_len] = start
    unfinished = np.ones(batch, dtype=bool)
    live = np.arange(batch)  # batch entries computed by the last step call, in its row order
    rows, tokens = live, start
    rows_computed = steps = 0
    while True:
        logits = _call(step, rows, tokens)
        rows_computed += len(rows)
        steps += 1
        history = sequences[live, :cur_len] if config.no_repeat_ngram_size else None
        scores = _process(logits, cur_len, history, config, forced_bos)
        chosen = np.where(unfinished[live], scores.argmax(axis=-1), pad)  # argmax: first index on ties, as torch
        sequences[live, cur_len] = chosen
        cur_len += 1
        unfinished[live] &= ~np.isin(chosen, eos)
        if cur_len >= max_length or not unfinished.any():
            break
        keep = np.flatnonzero(unfinished[live]) if config.prune else np.arange(len(live))
        live, rows, tokens = live[keep], keep, chosen[keep, None]
    return SearchResult(sequences[:, :cur_len], None, rows_computed, steps)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, best first, lower index first among equal scores.

    torch.topk's order among exactly equal scores is unspecified; in beam search such ties only arise between
    excluded (-inf / -1e9) candidates, whose order does not reach the output.
    """
    n, width = scores.shape
    stride = width // _SAMPLE
    if stride >= 16:
        # The k-th largest of a strided sample bounds the row's k-th largest from below: keep what reaches it,
        # then sort those few. Falls back to argpartition when the bound is weak (many equal or -inf scores).
        sample = scores[:, ::stride]
        floor = np.partition(sample, sample.shape[1] - k, axis=1)[:, -k]
        flat = np.flatnonzero(scores >= floor[:, None])
        if flat.size <= 4 * k * stride * n:  # about k * stride per row expected
            row, col = np.divmod(flat, width)  # row ascending
            counts = np.bincount(row, minlength=n)
            if counts.min() >= k:
                order = np.lexsort((col, -scores.reshape(-1)[flat], row))
                starts = np.cumsum(counts) - counts
                return col[order[starts[:, None] + np.arange(k)]]
    if k < width:
        picked = np.argpartition(scores, width - k, axis=1)[:, -k:]
    else:
        picked = np.broadcast_to(np.arange(width), scores.shape)
    values = np.take_along_axis(scores, picked, axis=1)
    return np.take_along_axis(picked, np.lexsort((picked, -values), axis=-1), axis=1)


def _best_first(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")


def _beam(step: StepFn, start: np.ndarray, eos: np.ndarray, pad: int, max_length: int, config: SearchConfig,
          forced_bos: int | None) -> SearchResult:
    """transformers' vectorised `_beam_search` (as of 5.24), step for step, on the live batch entries only."""
    batch, prompt_len = start.shape
    beams, penalty, early = config.num_beams, config.length_penalty, config.early_stopping
    keep_k = max(2, 1 + len(eos)) * beams  # candidates per entry: enough that num_beams of them are not EOS
    # HF fills with `pad_token_id or eos_token_id[0]`: a pad id of 0 is falsy there, so EOS pads the output.
    fill = int(eos[0]) if pad == 0 and len(eos) else pad

    # Running beams of the live entries.
    running = np.full((batch, beams, max_length), fill, dtype=np.int64)
    running[:, :, :prompt_len] = start[:, None, :]
    running_scores = np.zeros((batch, beams), dtype=np.float32)
    running_scores[:, 1:] = _EXCLUDED  # only the first beam's continuations count at the first step
    # Finished hypotheses of every entry, best first.
    finished = running.copy()
    finished_scores = np.full((batch, beams), _EXCLUDED, dtype=np.float32)
    finished_lengths = np.zeros((batch, beams), dtype=np.int64)  # generated tokens, EOS included
    is_finished = np.zeros((batch, beams), dtype=bool)
    improvable = np.ones(batch, dtype=bool)  # HF's is_early_stop_heuristic_unsatisfied

    live = np.arange(batch)
    rows, tokens = np.repeat(live, beams), np.repeat(start, beams, axis=0)
    rows_computed = steps = 0
    cur_len = prompt_len
    candidate_rank = np.arange(keep_k)
    while True:
        logits = _call(step, rows, tokens)
        rows_computed += len(rows)
        steps += 1
        n, vocab = len(live), logits.shape[1]
        if vocab * beams < keep_k:
            raise MoerunError(f"beam search with {beams} beams needs a vocabulary of at least {keep_k // beams} "
                              f"tokens, the decoder returned {vocab}")
        history = running[:, :, :cur_len].reshape(n * beams, cur_len) if config.no_repeat_ngram_size else None
        log_probs = _process(log_softmax(logits), cur_len, history, config, forced_bos)
        accumulated = log_probs.reshape(n, beams, vocab)
        accumulated += running_scores[:, :, None]
        accumulated = accumulated.reshape(n, beams * vocab)

        # Top-k continuations over all beams of each entry.
        top = _top_k(accumulated, keep_k)
        top_scores = np.take_along_axis(accumulated, top, axis=1)
        parent, token = top // vocab, top % vocab
        candidates = np.take_along_axis(running, parent[:, :, None], axis=1)
        candidates[:, :, cur_len] = token
        hits = np.isin(token, eos) | (cur_len + 1 >= max_length)  # HF's stopping criteria on each candidate

        # The best num_beams candidates that did not stop keep running.
        open_scores = top_scores + hits.astype(np.float32) * _EXCLUDED
        chosen = _best_first(open_scores)[:, :beams]
        running = np.take_along_axis(candidates, chosen[:, :, None], axis=1)
        running_scores = np.take_along_axis(open_scores, chosen, axis=1)
        next_rows = np.take_along_axis(parent, chosen, axis=1)
        next_tokens = np.take_along_axis(token, chosen, axis=1)

        # Candidates among the top num_beams that stopped compete with the finished hypotheses.
        just_finished = hits & (candidate_rank < beams)
        final = top_scores / np.float32((cur_len + 1 - prompt_len) ** penalty)
        full = is_finished[live].all(axis=1) & (early is True)
        final = final + full[:, None].astype(np.float32) * _EXCLUDED
        final = final + (~improvable[live])[:, None].astype(np.float32) * _EXCLUDED
        final = final + (~just_finished).astype(np.float32) * _EXCLUDED
        merged_scores = np.concatenate([finished_scores[live], final], axis=1)
        best = _best_first(merged_scores)[:, :beams]
        finished[live] = np.take_along_axis(np.concatenate([finished[live], candidates], axis=1),
                                            best[:, :, None], axis=1)
        finished_scores[live] = np.take_along_axis(merged_scores, best, axis=1)
        new_lengths = np.full((n, keep_k), cur_len + 1 - prompt_len, dtype=np.int64)
        finished_lengths[live] = np.take_along_axis(np.concatenate([finished_lengths[live], new_lengths], axis=1),
                                                    best, axis=1)
        is_finished[live] = np.take_along_axis(np.concatenate([is_finished[live], just_finished], axis=1),
                                               best, axis=1)
        cur_len += 1

        # Can a running beam still beat the worst finished hypothesis? (HF's _check_early_stop_heuristic)
        hypothetical = max_length - prompt_len if early == "never" and penalty > 0.0 else cur_len - prompt_len
        best_running = running_scores[:, :1] / np.float32(hypothetical ** penalty)
        worst_finished = np.where(is_finished[live], finished_scores[live].min(axis=1, keepdims=True), _EXCLUDED)
        improvable[live] &= (best_running > worst_finished).any(axis=1)

        # HF's loop condition, over the whole batch. Pruned entries keep their last `improvable`: HF would keep
        # updating it, which can only matter when every live entry is already not improvable (all-(-inf) scores).
        all_finished = is_finished.all(axis=1)
        if not improvable.any() or (early is True and all_finished.all()) or hits.all():
            break
        # An entry is done when its num_beams hypotheses are final and nothing can displace them any more.
        done = all_finished[live] & (~improvable[live] | (early is True))
        keep = np.flatnonzero(~done) if config.prune else np.arange(n)
        if keep.size == 0:
            break
        rows = (keep[:, None] * beams + next_rows[keep]).reshape(-1)
        tokens = next_tokens[keep].reshape(-1, 1)
        live, running, running_scores = live[keep], running[keep], running_scores[keep]

    returned = config.num_return_sequences
    length = prompt_len + int(finished_lengths[:, :returned].max())
    log.debug("beam search: %d steps, %d decoder rows", steps, rows_computed)
    return SearchResult(finished[:, :returned, :length].reshape(batch * returned, length),
                        finished_scores[:, :returned].reshape(-1).copy(), rows_computed, steps)
