"""Greedy and beam search in NumPy against transformers' `generate` on tiny random seq2seq MoE models.

Both sides see the same logits: the oracle runs `generate(use_cache=False)` (full recompute each step) and our
`step` recomputes the full decoder history of each row, with the encoder output gathered per row. Logits are
normalised and get an EOS bonus that grows with the position, so that batch entries finish at different steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    NllbMoeConfig,
    NllbMoeForConditionalGeneration,
    SwitchTransformersConfig,
    SwitchTransformersForConditionalGeneration,
)

from moerun.runtime.errors import MoerunError
from moerun.runtime.search import SearchConfig, search

VOCAB = 96
NEW_TOKENS = 12
SOURCE_LENGTHS = (7, 3, 5, 6)


def _switch() -> tuple[torch.nn.Module, dict]:
    config = SwitchTransformersConfig(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        num_experts=4, encoder_sparse_step=1, decoder_sparse_step=1, relative_attention_num_buckets=8,
        expert_capacity=1000,  # no token dropping: a row's logits must not depend on the other rows
        router_jitter_noise=0.0, dropout_rate=0.0, initializer_factor=3.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    return SwitchTransformersForConditionalGeneration(config).eval(), dict(start=0, eos=1, pad=0, bos=5)


def _nllb() -> tuple[torch.nn.Module, dict]:
    config = NllbMoeConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=4, decoder_attention_heads=4, num_experts=4, encoder_sparse_step=1,
        decoder_sparse_step=1, expert_capacity=1000,
        moe_eval_capacity_token_fraction=2.0,  # capacity above any expert's load: no batch-dependent dropping
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0, decoder_layerdrop=0.0,
        max_position_embeddings=64, init_std=0.5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2)
    torch.manual_seed(0)
    return NllbMoeForConditionalGeneration(config).eval(), dict(start=2, eos=2, pad=1, bos=7)


def _sharpen(model: torch.nn.Module, eos: int) -> None:
    """Logits with std 3, plus 0.8 per decoder position on EOS: varied text, and entries that end at different steps."""
    ramp = torch.zeros(VOCAB)
    ramp[eos] = 0.8

    def hook(module, inputs, logits):
        positions = torch.arange(logits.shape[1], dtype=logits.dtype)[:, None]
        return logits / logits.std(-1, keepdim=True) * 3 + positions * ramp

    model.lm_head.register_forward_hook(hook)


@pytest.fixture(scope="module", params=["switch", "nllb_moe"])
def seq2seq(request):
    model, tokens = (_switch if request.param == "switch" else _nllb)()
    _sharpen(model, tokens["eos"])
    generator = torch.Generator().manual_seed(1)
    ids = torch.full((len(SOURCE_LENGTHS), max(SOURCE_LENGTHS)), tokens["pad"])
    mask = torch.zeros_like(ids)
    for row, length in enumerate(SOURCE_LENGTHS):
        ids[row, :length] = torch.randint(3, VOCAB, (length,), generator=generator)
        ids[row, length - 1] = tokens["eos"]
        mask[row, :length] = 1
    with torch.no_grad():
        encoded = model.get_encoder()(input_ids=ids, attention_mask=mask)
    return model, tokens, ids, mask, encoded


class TorchDecoder:
    """The `step` callback: per-row token histories gathered by `rows`, full decoder recompute, no cache."""

    def __init__(self, model, mask, encoded):
        self.model, self.mask, self.encoded = model, mask, encoded
        self.source = self.history = None
        self.calls: list[int] = []

    def __call__(self, rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        assert rows.dtype == np.int64 and tokens.dtype == np.int64 and len(rows) == len(tokens)
        rows, tokens = torch.from_numpy(rows), torch.from_numpy(tokens)
        if self.history is None:
            self.source, self.history = rows, tokens
        else:
            assert tokens.shape[1] == 1
            self.source, self.history = self.source[rows], torch.cat([self.history[rows], tokens], dim=1)
        self.calls.append(len(rows))
        state = type(self.encoded)(last_hidden_state=self.encoded.last_hidden_state[self.source])
        with torch.no_grad():
            out = self.model(encoder_outputs=state, attention_mask=self.mask[self.source],
                             decoder_input_ids=self.history, use_cache=False)
        return out.logits[:, -1].float().numpy()


def _start(tokens: dict, prompt: tuple[int, ...] = ()) -> np.ndarray:
    return np.array([[tokens["start"], *prompt]] * len(SOURCE_LENGTHS), dtype=np.int64)


def _hf(seq2seq, start: np.ndarray, forced_bos: int | None, **kwargs):
    model, tokens, ids, mask, _ = seq2seq
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.from_numpy(start),
                              do_sample=False, use_cache=False, eos_token_id=tokens["eos"],
                              pad_token_id=tokens["pad"], forced_bos_token_id=forced_bos,
                              return_dict_in_generate=True, output_scores=True, **kwargs)


def _ours(seq2seq, start: np.ndarray, forced_bos: int | None, prune: bool, **kwargs):
    model, tokens, _, mask, encoded = seq2seq
    decoder = TorchDecoder(model, mask, encoded)
    result = search(decoder, len(start), start, eos_token_id=tokens["eos"], pad_token_id=tokens["pad"],
                    config=SearchConfig(prune=prune, **kwargs), forced_bos_token_id=forced_bos)
    assert result.rows_computed == sum(decoder.calls) and result.steps == len(decoder.calls)
    return result, decoder.calls


CASES = {
    "greedy": dict(num_beams=1),
    "greedy_no_repeat_ngram": dict(num_beams=1, no_repeat_ngram_size=2),
    "greedy_forced_bos": dict(num_beams=1, forced_bos=True),
    "beam4": dict(num_beams=4),
    "beam4_early_stopping": dict(num_beams=4, early_stopping=True),
    "beam3_never_lp2": dict(num_beams=3, length_penalty=2.0, early_stopping="never"),
    "beam4_lp2": dict(num_beams=4, length_penalty=2.0),
    "beam4_never_negative_lp": dict(num_beams=4, length_penalty=-0.5, early_stopping="never"),
    "beam4_no_repeat_ngram": dict(num_beams=4, no_repeat_ngram_size=2),
    "beam4_forced_bos": dict(num_beams=4, forced_bos=True),
    "beam4_return2_lp0.5": dict(num_beams=4, num_return_sequences=2, length_penalty=0.5),
    "beam4_two_token_prompt": dict(num_beams=4, length_penalty=2.0, prompt=(9,), forced_bos=True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_search_matches_hf_generate_with_and_without_pruning(seq2seq, case):
    case = dict(case)
    tokens = seq2seq[1]
    forced_bos = tokens["bos"] if case.pop("forced_bos", False) else None  # ignored by HF after a longer prompt
    start = _start(tokens, case.pop("prompt", ()))
    expected = _hf(seq2seq, start, forced_bos, max_new_tokens=NEW_TOKENS, **case)
    pruned, pruned_calls = _ours(seq2seq, start, forced_bos, prune=True, max_new_tokens=NEW_TOKENS, **case)
    full, full_calls = _ours(seq2seq, start, forced_bos, prune=False, max_new_tokens=NEW_TOKENS, **case)

    np.testing.assert_array_equal(pruned.sequences, expected.sequences.numpy())
    np.testing.assert_array_equal(full.sequences, pruned.sequences)
    if case["num_beams"] > 1:
        np.testing.assert_allclose(pruned.scores, expected.sequences_scores.numpy(), rtol=1e-5, atol=1e-6)
        # The decoder's float noise depends on how many rows it computes, the search does not: close, not equal.
        np.testing.assert_allclose(full.scores, pruned.scores, rtol=1e-5, atol=1e-6)
    else:
        assert pruned.scores is None
    # Without pruning every call computes the whole batch, as HF does; with it the batch only shrinks.
    rows_per_call = len(start) * case["num_beams"]
    assert full_calls == [rows_per_call] * len(full_calls)
    assert pruned_calls[0] == rows_per_call and pruned_calls == sorted(pruned_calls, reverse=True)
    assert all(n % case["num_beams"] == 0 for n in pruned_calls)
    assert pruned.steps <= full.steps and pruned.rows_computed <= full.rows_computed


@pytest.mark.parametrize("num_beams", [1, 4])
def test_pruning_skips_finished_entries(seq2seq, num_beams):
    tokens = seq2seq[1]
    start = _start(tokens)
    eos_at = []
    pruned, calls = _ours(seq2seq, start, tokens["bos"], prune=True, num_beams=num_beams, max_new_tokens=NEW_TOKENS)
    full, _ = _ours(seq2seq, start, tokens["bos"], prune=False, num_beams=num_beams, max_new_tokens=NEW_TOKENS)
    for row in pruned.sequences[:, 1:]:
        hits = np.flatnonzero(row == tokens["eos"])
        eos_at.append(int(hits[0]) if hits.size else None)
    assert len(set(eos_at)) > 1, f"entries should finish at different steps, EOS positions {eos_at}"
    np.testing.assert_array_equal(pruned.sequences, full.sequences)
    assert pruned.rows_computed < full.rows_computed, (pruned.rows_computed, full.rows_computed, calls)


def test_beam_output_is_padded_like_hf(seq2seq):
    """HF fills finished beams with `pad_token_id or eos_token_id[0]`: EOS when the pad id is 0 (Switch)."""
    tokens = seq2seq[1]
    result, _ = _ours(seq2seq, _start(tokens), tokens["bos"], prune=True, num_beams=4, max_new_tokens=NEW_TOKENS)
    fill = tokens["eos"] if tokens["pad"] == 0 else tokens["pad"]
    ended = [row for row in result.sequences if (row[1:] == tokens["eos"]).any()]
    assert ended
    for row in ended:
        first = 1 + int(np.flatnonzero(row[1:] == tokens["eos"])[0])
        assert (row[first + 1:] == fill).all()


def _constant_step(vocab: int = 16):
    def step(rows, tokens):
        return np.tile(np.linspace(0.0, 1.0, vocab, dtype=np.float32), (len(rows), 1))
    return step


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_beams=0), "num_beams"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(early_stopping=1), "early_stopping"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(length_penalty=float("nan")), "length_penalty"),
])
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(MoerunError, match=message):
        SearchConfig(**kwargs)


def test_bad_search_arguments_are_refused():
    start = np.zeros((2, 3), dtype=np.int64)
    with pytest.raises(MoerunError, match="max_length"):
        search(_constant_step(), 2, start, eos_token_id=1, pad_token_id=0, config=SearchConfig(max_length=3))
    with pytest.raises(MoerunError, match="start_ids"):
        search(_constant_step(), 3, start, eos_token_id=1, pad_token_id=0, config=SearchConfig())
    with pytest.raises(MoerunError, match="integer"):
        search(_constant_step(), 2, start.astype(np.float32), eos_token_id=1, pad_token_id=0, config=SearchConfig())
    with pytest.raises(MoerunError, match="forced_bos_token_id"):
        search(_constant_step(), 2, start[:, :1], eos_token_id=1, pad_token_id=0, config=SearchConfig(),
               forced_bos_token_id=99)
    with pytest.raises(MoerunError, match="vocabulary"):
        search(_constant_step(vocab=1), 2, start, eos_token_id=1, pad_token_id=0,
               config=SearchConfig(num_beams=2, max_new_tokens=2))
    with pytest.raises(MoerunError, match="logits of shape"):
        search(lambda rows, tokens: np.zeros((len(rows) + 1, 8), np.float32), 2, start, eos_token_id=1,
               pad_token_id=0, config=SearchConfig(max_new_tokens=2))


def test_top_k_orders_best_first_and_lower_index_first_on_ties():
    from moerun.runtime.search import _top_k

    rng = np.random.default_rng(0)
    wide = rng.standard_normal((3, 140_000)).astype(np.float32)  # wide enough for the sampled-threshold path
    wide[0, [70_000, 5, 139_999, 3]] = 10.0
    wide[1, ::2] = 7.0  # many ties: falls back to argpartition, whose top 8 are all tied at 7 here
    wide[2, :] = -np.inf
    wide[2, rng.choice(140_000, 20, replace=False)] = rng.standard_normal(20).astype(np.float32)
    for scores in (wide[[0]], wide[[0, 2]], rng.standard_normal((4, 50)).astype(np.float32)):
        np.testing.assert_array_equal(_top_k(scores, 8), np.argsort(-scores, axis=1, kind="stable")[:, :8])
    top = _top_k(wide, 8)
    assert (wide[1, top[1]] == 7.0).all() and (np.diff(wide[2, top[2]]) <= 0).all()
    np.testing.assert_array_equal(top[0, :4], [3, 5, 70_000, 139_999])
