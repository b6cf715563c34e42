"""The model directory's tokenizer, through the `tokenizers` library.

transformers' AutoTokenizer wraps the same tokenizer.json, but in transformers 5 importing it
imports torch, which a serving host must not need; so the runtime reads tokenizer.json directly, and
from tokenizer_config.json (special_tokens_map.json in older saves) what the transformers class adds:
NLLB's source template and language codes, and the decode clean-up.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import DecodeStream

from .errors import ModelDirError, UnsupportedModelError

__all__ = ["TextStream", "Tokenizer"]

# NLLB's (FLORES-200) language codes: ISO 639-3 + ISO 15924 script, e.g. eng_Latn, zho_Hans.
_LANGUAGE_CODE = re.compile(r"^[a-z]{3}_[A-Z][a-z]{3}$")
_DEFAULT_SRC_LANG = "eng_Latn"  # NllbTokenizer's source language when tokenizer_config.json names none
_EXAMPLE_LANGUAGES = ("eng_Latn", "fra_Latn", "deu_Latn", "zho_Hans")
# transformers' clean_up_tokenization: spaces a word-level detokenizer leaves before punctuation
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


_RESAVE = "save the model's tokenizer again, or remove the tokenizer files and pass token ids"


def _content(token) -> str | None:
    token = token.get("content") if isinstance(token, dict) else token
    return token if isinstance(token, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # UnicodeDecodeError included
        raise ModelDirError(f"{path}: not valid JSON ({e}); {_RESAVE}") from None
    if not isinstance(data, dict):
        raise ModelDirError(f"{path}: not a JSON object; {_RESAVE}")
    return data


class Tokenizer:
    """tokenizer.json plus what transformers' tokenizer class does around it, for the families moerun serves:
    plain templates (Mixtral, T5/Switch: pieces </s>) and NLLB's language-code template."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ModelDirError(f"{directory}: no tokenizer.json; pass token ids instead of text")
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exception for a file it cannot read
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ModelDirError(f"{path}: the tokenizers library cannot read it ({reason}); {_RESAVE}") from None
        self.config = _read_json(directory / "tokenizer_config.json")
        special_map = _read_json(directory / "special_tokens_map.json")
        # The codes are added tokens of tokenizer.json, whatever the config lists them as (additional_special_tokens
        # before transformers 5, extra_special_tokens since, or nothing): tokenizer.json alone decides their ids.
        added = self._tok.get_added_tokens_decoder()
        self._language_ids = {added[i].content: i for i in sorted(added) if _LANGUAGE_CODE.match(added[i].content)}
        self.languages: list[str] = list(self._language_ids)
        self.is_nllb = bool(self.languages) or str(self.config.get("tokenizer_class", "")).startswith("Nllb")
        eos = _content(self.config.get("eos_token") or special_map.get("eos_token")) or "</s>"
        self.eos_id = self._tok.token_to_id(eos)
        # transformers 5 cleans up only where the config asks and the model is not BPE (NLLB is BPE, T5 Unigram).
        self._clean_up = bool(self.config.get("clean_up_tokenization_spaces")) and (
            type(self._tok.model).__name__ != "BPE"
            or bool(self.config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")))

    def encode_source(self, text: str, src_lang: str | None = None) -> list[int]:
        """A source sentence as transformers' tokenizer encodes it. NLLB: [src_lang] pieces </s> (legacy_behaviour:
        pieces </s> [src_lang]), src_lang defaulting to the config's, else eng_Latn; T5/Switch: pieces </s>."""
        if not self.is_nllb:
            if src_lang is not None:
                self.lang_id(src_lang)  # raises: this tokenizer has no language codes
            return self._tok.encode(text, add_special_tokens=True).ids
        lang = self.lang_id(src_lang or self.config.get("src_lang") or _DEFAULT_SRC_LANG)
        pieces = self._tok.encode(text, add_special_tokens=False).ids
        if self.config.get("legacy_behaviour"):
            return [*pieces, self.eos_id, lang]
        return [lang, *pieces, self.eos_id]

    def lang_id(self, code: str) -> int:
        """The token id of a language code (NLLB: the target language is the forced first generated token)."""
        if code in self._language_ids:
            return self._language_ids[code]
        if self.is_nllb and not self.languages:
            raise UnsupportedModelError(
                f"language code {code!r} given, but this NLLB tokenizer.json has no language codes; re-save the "
                "tokenizer with them (transformers 5: NllbTokenizer.from_pretrained(..., extra_special_tokens="
                "FAIRSEQ_LANGUAGE_CODES) when building it from a sentencepiece model)")
        if not self.languages:
            raise UnsupportedModelError(f"language code {code!r} given, but this model's tokenizer has no language "
                                        "codes; leave the source and target language out")
        close = [c for c in self.languages if code and c.lower().startswith(code.lower())][:5]
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        examples = [c for c in _EXAMPLE_LANGUAGES if c in self._language_ids] or self.languages[:4]
        raise UnsupportedModelError(f"unknown language code {code!r}; {hint}this model knows {len(self.languages)} "
                                    f"language_Script codes (e.g. {', '.join(examples)})")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        """Text without special tokens (pads, </s>, language codes), clean-up included: what transformers'
        decode(..., skip_special_tokens=True) gives."""
        text = self._tok.decode(list(ids), skip_special_tokens=True)
        return _clean_up(text) if self._clean_up else text

    def text_stream(self, skip_special_tokens: bool = True) -> TextStream:
        """Token ids to text one at a time, without re-decoding the sequence (see TextStream)."""
        return TextStream(self, skip_special_tokens)

    def to_json(self) -> str:
        """tokenizer.json's content (what llguidance indexes)."""
        return self._tok.to_str()

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class TextStream:
    """Token ids to text as they arrive: tokenizers' DecodeStream (it keeps a few ids of context, never the whole
    sequence; a piece is returned once its characters are whole), then transformers' clean-up where the tokenizer
    applies it. The pieces joined, with ``flush()``, equal ``decode`` of all the ids."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._pending = ""  # a tail the clean-up could still rewrite once the next piece arrives

    def step(self, token: int) -> str:
        piece = self._stream.step(self._tokenizer._tok, int(token)) or ""
        if not self._tokenizer._clean_up:
            return piece
        text = self._pending + piece
        # every clean-up pattern starts with a space and is at most 4 characters long: a space among the last 3
        # characters may begin one that the next piece completes, and no pattern found may straddle the cut
        space = text.find(" ", max(0, len(text) - 3))
        cut = space if space >= 0 else len(text)
        for before, _ in _CLEAN_UP:
            at = text.find(before, max(0, cut - len(before) + 1))
            if 0 <= at < cut < at + len(before):
                cut = at
        self._pending = text[cut:]
        return _clean_up(text[:cut])

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return _clean_up(text)


def _clean_up(text: str) -> str:
    for before, after in _CLEAN_UP:
        text = text.replace(before, after)
    return text
