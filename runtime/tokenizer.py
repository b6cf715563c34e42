"""The model directory's tokenizer, through the `tokenizers` library.

transformers' AutoTokenizer wraps the same tokenizer.json, but in transformers 5 importing it
imports torch, which a serving host must not need; so the runtime reads tokenizer.json directly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from .errors import ModelDirError, MoerunError

__all__ = ["Tokenizer"]

# NLLB's (FLORES-200) language codes: ISO 639-3 + ISO 15924 script, e.g. eng_Latn, zho_Hans.
_LANGUAGE_CODE = re.compile(r"^[a-z]{3}_[A-Z][a-z]{3}$")


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


class Tokenizer:
    def __init__(self, directory: str | Path) -> None:
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise ModelDirError(f"{directory}: no tokenizer.json; pass token ids instead of text")
        self._tok = _HFTokenizer.from_file(str(path))
        config_file = Path(directory) / "tokenizer_config.json"
        self.config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        specials = self.config.get("extra_special_tokens") or self.config.get("additional_special_tokens") or []
        self.languages = [t for t in map(_content, specials) if t and _LANGUAGE_CODE.match(t)]
        eos = _content(self.config.get("eos_token")) or "</s>"
        self.eos_id = self._tok.token_to_id(eos)

    def encode_source(self, text: str, src_lang: str | None = None) -> list[int]:
        """A source sentence as the original tokenizer encodes it. NLLB: [src_lang] pieces </s>
        (its legacy_behaviour: pieces </s> [src_lang]); other models: their own template (T5: pieces </s>)."""
        if not self.languages:
            return self._tok.encode(text, add_special_tokens=True).ids
        lang = self.lang_id(src_lang or self.config.get("src_lang") or "eng_Latn")
        pieces = self._tok.encode(text, add_special_tokens=False).ids
        if self.config.get("legacy_behaviour"):
            return [*pieces, self.eos_id, lang]
        return [lang, *pieces, self.eos_id]

    def lang_id(self, code: str) -> int:
        """The token id of a language code (NLLB: the target language is the forced first token)."""
        token_id = self._tok.token_to_id(code) if code in self.languages else None
        if token_id is None and not self.languages:
            raise MoerunError(f"language code {code!r} given, but this model's tokenizer has no language codes")
        if token_id is None:
            raise MoerunError(f"unknown language code {code!r}; this tokenizer knows {len(self.languages)} "
                              f"(e.g. {', '.join(self.languages[:5])})")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)
