"""The runtime's tokenizer (tokenizers only, no transformers) against transformers' own NLLB and T5 tokenizers,
built from SentencePiece models trained offline (conftest: nllb_tokenizer, t5_tokenizer), saved as a model dir
holds them and loaded back by both sides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES

from conftest import train_sentencepiece
from moerun import MoerunError
from moerun.runtime.errors import UnsupportedModelError
from moerun.runtime.tokenizer import Tokenizer

SENTENCES = ["Return the number of items in a container.", "def main():", "  spaces  and\ttabs ", "é ü ß 中",
             "Hello , world . Isn 't it ? I 'm sure !", ""]


def saved(tokenizer, directory: Path, special_tokens_map: dict | None = None, **config) -> Path:
    """``tokenizer.save_pretrained(directory)``, then tokenizer_config.json edited (None removes a key) as other
    transformers versions or users write it."""
    tokenizer.save_pretrained(directory)
    path = directory / "tokenizer_config.json"
    data = json.loads(path.read_text())
    for key, value in config.items():
        data.pop(key) if value is None else data.__setitem__(key, value)
    path.write_text(json.dumps(data))
    if special_tokens_map is not None:
        (directory / "special_tokens_map.json").write_text(json.dumps(special_tokens_map))
    return directory


def both(directory: Path):
    """moerun's tokenizer and transformers' (the class tokenizer_config.json names) on the same directory."""
    return Tokenizer(directory), AutoTokenizer.from_pretrained(directory)


def nllb_generations(hf, tgt_lang: str) -> list[list[int]]:
    """Rows shaped like NLLB's generate output: </s> tgt_lang pieces </s>, right-padded with <pad>."""
    rows = [[hf.eos_token_id, hf.convert_tokens_to_ids(tgt_lang), *hf(t).input_ids[1:-1], hf.eos_token_id]
            for t in SENTENCES]
    width = max(map(len, rows))
    return [row + [hf.pad_token_id] * (width - len(row)) for row in rows]


@pytest.fixture(scope="module")
def nllb_dir(nllb_tokenizer, tmp_path_factory) -> Path:
    return saved(nllb_tokenizer, tmp_path_factory.mktemp("nllb-tok"))


@pytest.mark.parametrize("src_lang", ["eng_Latn", "fra_Latn", "zho_Hans"])
def test_nllb_source_ids_match_transformers(nllb_dir, src_lang):
    ours, hf = both(nllb_dir)
    hf.src_lang = src_lang
    for text in SENTENCES:
        expected = hf(text).input_ids
        assert ours.encode_source(text, src_lang) == expected
        assert expected[0] == hf.convert_tokens_to_ids(src_lang) and expected[-1] == hf.eos_token_id


@pytest.mark.parametrize("src_lang", [None, "deu_Latn"])
def test_nllb_default_source_language_is_the_configs_else_english(nllb_tokenizer, tmp_path, src_lang):
    ours, hf = both(saved(nllb_tokenizer, tmp_path, src_lang=src_lang))
    assert ours.encode_source(SENTENCES[0]) == hf(SENTENCES[0]).input_ids
    assert ours.encode_source(SENTENCES[0])[0] == ours.lang_id(src_lang or "eng_Latn")


def test_nllb_legacy_behaviour_puts_the_language_code_last(nllb_tokenizer, tmp_path):
    ours, hf = both(saved(nllb_tokenizer, tmp_path, legacy_behaviour=True))
    hf.src_lang = "fra_Latn"
    for text in SENTENCES:
        assert ours.encode_source(text, "fra_Latn") == hf(text).input_ids
    assert ours.encode_source("x", "fra_Latn")[-2:] == [hf.eos_token_id, hf.convert_tokens_to_ids("fra_Latn")]


@pytest.mark.parametrize("listed_as", ["extra_special_tokens", "additional_special_tokens", "special_tokens_map",
                                       "nowhere"])
def test_nllb_language_codes_and_forced_bos_however_the_config_lists_them(nllb_tokenizer, tmp_path, listed_as):
    """transformers 5 writes extra_special_tokens, 4.x additional_special_tokens (older: special_tokens_map.json);
    the ids come from tokenizer.json's added tokens either way."""
    edits = {
        "extra_special_tokens": {},
        "additional_special_tokens": dict(extra_special_tokens=None, additional_special_tokens=FAIRSEQ_LANGUAGE_CODES),
        "special_tokens_map": dict(extra_special_tokens=None,
                                   special_tokens_map={"additional_special_tokens": FAIRSEQ_LANGUAGE_CODES}),
        "nowhere": dict(extra_special_tokens=None),
    }[listed_as]
    ours, hf = both(saved(nllb_tokenizer, tmp_path, **edits))
    assert ours.languages == FAIRSEQ_LANGUAGE_CODES and len(ours.languages) == 202
    for code in ("deu_Latn", "fra_Latn", "arb_Arab", "zul_Latn"):
        assert ours.lang_id(code) == hf.convert_tokens_to_ids(code) != hf.unk_token_id
    hf.src_lang = "arb_Arab"
    assert ours.encode_source(SENTENCES[0], "arb_Arab") == hf(SENTENCES[0]).input_ids


def test_unknown_language_code_names_the_known_ones(nllb_dir):
    ours = Tokenizer(nllb_dir)
    with pytest.raises(UnsupportedModelError, match=r"unknown language code 'xx_Latn'; this model knows 202.*fra_"):
        ours.lang_id("xx_Latn")
    with pytest.raises(MoerunError, match="did you mean fra_Latn"):
        ours.encode_source("Bonjour", "fra")
    with pytest.raises(MoerunError, match="did you mean eng_Latn"):
        ours.lang_id("eng_latn")


def test_nllb_tokenizer_without_language_codes_says_how_to_rebuild_it(tmp_path):
    """transformers 5's NllbTokenizer built from a bare sentencepiece model has no codes (they map to <unk>)."""
    from transformers import NllbTokenizer

    bare = NllbTokenizer.from_pretrained(train_sentencepiece(tmp_path / "spm", "sentencepiece.bpe.model"))
    assert bare.convert_tokens_to_ids("fra_Latn") == bare.unk_token_id
    ours = Tokenizer(saved(bare, tmp_path / "saved"))
    assert ours.is_nllb and ours.languages == []
    with pytest.raises(UnsupportedModelError, match="has no language codes; re-save .*extra_special_tokens"):
        ours.encode_source("Hello", "eng_Latn")


@pytest.mark.parametrize("clean_up", [False, True])
def test_nllb_decode_of_generations_matches_batch_decode(nllb_tokenizer, tmp_path, clean_up):
    """clean_up_tokenization_spaces (hub NLLB configs say true) is ignored by transformers 5 for BPE models."""
    ours, hf = both(saved(nllb_tokenizer, tmp_path, clean_up_tokenization_spaces=clean_up))
    for tgt_lang in ("fra_Latn", "deu_Latn"):
        rows = nllb_generations(hf, tgt_lang)
        expected = hf.batch_decode(rows, skip_special_tokens=True)
        assert [ours.decode(row) for row in rows] == expected
        assert expected[0] == SENTENCES[0] and expected[-1] == ""


@pytest.mark.parametrize("clean_up", [False, True])
def test_t5_source_ids_and_decode_match_transformers(t5_tokenizer, tmp_path, clean_up):
    """Switch Transformers: sources are pieces </s>; generations start with the pad (decoder start) token."""
    ours, hf = both(saved(t5_tokenizer, tmp_path, clean_up_tokenization_spaces=clean_up))
    assert ours.languages == [] and not ours.is_nllb
    for text in SENTENCES:
        assert ours.encode_source(text) == hf(text).input_ids
    pad, eos = hf.pad_token_id, hf.eos_token_id
    rows = [[pad, *hf(t).input_ids[:-1], eos] for t in SENTENCES]
    rows = [row + [pad] * (max(map(len, rows)) - len(row)) for row in rows]
    got = [ours.decode(row) for row in rows]
    assert got == hf.batch_decode(rows, skip_special_tokens=True)
    assert got[4].startswith("Hello, world." if clean_up else "Hello , world .")  # cleaned up exactly when asked


def test_t5_has_no_language_codes(t5_tokenizer, tmp_path):
    ours = Tokenizer(saved(t5_tokenizer, tmp_path))
    with pytest.raises(UnsupportedModelError, match="no language codes; leave the source and target language out"):
        ours.lang_id("fra_Latn")
    with pytest.raises(UnsupportedModelError, match="no language codes"):
        ours.encode_source("Hello", "eng_Latn")
