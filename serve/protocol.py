"""Request bodies in OpenAI's shapes (the subset moerun serves), checked strictly: a wrong type is a 400, not a
silent conversion. Responses are plain dicts built in app.py, in OpenAI's shapes."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["ChatMessage", "ChatRequest", "CompletionRequest", "TranslationRequest"]

_Int = Annotated[int, Field(strict=True)]


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _Sampling(BaseModel):
    """What completions and chat share. temperature 0 is greedy (as OpenAI's API), else sampling."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: _Int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: _Int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: _Int = 1
    stream: bool = False
    stream_options: _StreamOptions | None = None  # include_usage: a last chunk with the usage counts

    @field_validator("n")
    @classmethod
    def _one(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is served: send one request per completion")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @property
    def stops(self) -> list[str]:
        return self.stop or []


class CompletionRequest(_Sampling):
    prompt: str | list[_Int] | list[str]

    @field_validator("prompt")
    @classmethod
    def _single(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError("one prompt per request (a list of one string, a string, or token ids)")
            return prompt[0]
        if not prompt:
            raise ValueError("the prompt is empty")
        return prompt


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str
    content: str | list[_TextPart]

    def as_template_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class TranslationRequest(BaseModel):
    """POST /v1/translations (encoder-decoder models): one text, its languages (NLLB), beam size."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    text: str = Field(min_length=1)
    src_lang: str | None = None
    tgt_lang: str | None = None
    beams: _Int = Field(default=1, ge=1, le=16)
    max_tokens: _Int = Field(default=200, ge=1)
