"""The server's settings, importable without the web libraries (the CLI checks for those first)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ServeSettings"]


@dataclass
class ServeSettings:
    max_batch: int = 8  # requests decoded together (slots, or one static batch for traced/recurrent models)
    max_queue: int = 64  # requests waiting for a slot; past it 503 at once
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>" (checked before the body)
    max_body_bytes: int = 16 * 2**20  # a /v1 request body past this is refused (413) before it is parsed
    timeout: float | None = 600.0  # seconds from arrival to the last token; past it the request ends (504)
    max_len: int | None = None  # tokens per slot (prompt + max_tokens); None: the model's max_positions, at most 4096
    model_name: str | None = None  # the id clients send as "model"; None: the model directory's name
