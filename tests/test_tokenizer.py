"""The runtime's translation tokenizer (tokenizers only, no transformers) against transformers' own
NLLB and T5 tokenizers, built from SentencePiece models trained offline in conftest."""

from __future__ import annotations

import pytest

from moerun import MoerunError
from moerun.runtime.tokenizer import Tokenizer

SENTENCES = ["Return the number of items in a container.", "def main():", "  spaces  and\ttabs ", "é ü ß 中"]


@pytest.fixture(scope="module")
def nllb_dir(nllb_tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("nllb-tok")
    nllb_tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("src_lang", ["eng_Latn", "fra_Latn", "zho_Hans"])
def test_nllb_source_ids_match_transformers(nllb_tokenizer, nllb_dir, src_lang):
    ours = Tokenizer(nllb_dir)
    nllb_tokenizer.src_lang = src_lang
    for text in SENTENCES:
        expected = nllb_tokenizer(text).input_ids
        assert ours.encode_source(text, src_lang) == expected
        assert expected[0] == nllb_tokenizer.convert_tokens_to_ids(src_lang)  # the non-legacy prefix


def test_nllb_language_codes_and_forced_bos(nllb_tokenizer, nllb_dir):
    ours = Tokenizer(nllb_dir)
    assert len(ours.languages) == 202 and "deu_Latn" in ours.languages
    for code in ("deu_Latn", "fra_Latn", "arb_Arab"):
        assert ours.lang_id(code) == nllb_tokenizer.convert_tokens_to_ids(code)
    with pytest.raises(MoerunError, match="unknown language code 'xx_Latn'.*202"):
        ours.lang_id("xx_Latn")


def test_nllb_decode_of_a_generation_matches_transformers(nllb_tokenizer, nllb_dir):
    ours = Tokenizer(nllb_dir)
    nllb_tokenizer.src_lang = "eng_Latn"
    pieces = nllb_tokenizer(SENTENCES[0]).input_ids[1:-1]
    generated = [2, nllb_tokenizer.convert_tokens_to_ids("fra_Latn"), *pieces, 2, 1, 1]  # as generate returns it
    assert ours.decode(generated) == nllb_tokenizer.decode(generated, skip_special_tokens=True)


def test_t5_source_ids_match_transformers(t5_tokenizer, tmp_path):
    t5_tokenizer.save_pretrained(tmp_path)
    ours = Tokenizer(tmp_path)
    assert ours.languages == []
    for text in SENTENCES:
        assert ours.encode_source(text) == t5_tokenizer(text).input_ids
    with pytest.raises(MoerunError, match="no language codes"):
        ours.lang_id("fra_Latn")
