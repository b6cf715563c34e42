"""The model directory's tokenizer, through the `tokenizers` library.

transformers' AutoTokenizer wraps the same tokenizer.json, but in transformers 5 importing it
imports torch, which a serving host must not need; so the runtime reads tokenizer.json directly.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from .errors import ModelDirError

__all__ = ["Tokenizer"]


class Tokenizer:
    def __init__(self, directory: str | Path) -> None:
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise ModelDirError(f"{directory}: no tokenizer.json; pass token ids instead of text")
        self._tok = _HFTokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)
