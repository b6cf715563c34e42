"""Request bodies in OpenAI's shapes, checked strictly: a wrong type is a 400, not a silent conversion, and a field
moerun does not implement is a 400 that names it (``extra="forbid"``), never silently dropped. Responses are plain
dicts built by the serving classes, in OpenAI's shapes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["ChatMessage", "ChatRequest", "CompletionRequest", "TranslationRequest"]

_Int = Annotated[int, Field(strict=True)]
MAX_STOP_CHARS = 256  # per stop string: the text held back while it could still begin one is at most this long


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _StreamOptions(_Strict):
    include_usage: bool = False


class _JsonSchema(_Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """``text`` (free), ``json_object`` (any JSON object) or ``json_schema`` (JSON valid against it)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema (with its schema) goes with type 'json_schema', and only with it")
        return self

    @property
    def schema(self) -> dict | None:
        if self.type == "json_object":
            return {"type": "object"}
        return self.json_schema.schema_ if self.json_schema is not None else None


class _Sampling(_Strict):
    """What completions and chat share. temperature 0 is greedy (as OpenAI's API), else sampling. ``model`` may be
    left out: this server serves one model."""

    model: str | None = None
    max_tokens: _Int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: _Int = Field(default=0, ge=0)  # an extension (vLLM, llama.cpp): 0 keeps every token
    seed: _Int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: _Int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: _StreamOptions | None = None  # include_usage: a last chunk with the usage counts
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)  # an extension (vLLM): transformers' definition
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None  # an end-user id for the provider's abuse monitoring: nothing for moerun to do with it

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop takes up to 4 non-empty strings of at most {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias):
        for token, value in (bias or {}).items():
            if not token.isdigit() or not -100 <= value <= 100:
                raise ValueError("logit_bias maps token ids (as strings) to numbers in [-100, 100]")
        return bias

    @model_validator(mode="after")
    def _stream_options_with_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options goes with stream: true")
        return self

    @property
    def stops(self) -> list[str]:
        return self.stop or []

    @property
    def token_bias(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}


class CompletionRequest(_Sampling):
    prompt: str | list[_Int] | list[str]
    logprobs: _Int | None = Field(default=None, ge=0, le=20)
    echo: Literal[False] = False  # the prompt is never repeated in the text
    best_of: Literal[1] | None = None
    suffix: None = None

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

    @property
    def logprobs_k(self) -> int | None:
        """None: no logprobs; k: the chosen token's and the k most likely."""
        return self.logprobs


class _TextPart(_Strict):
    type: Literal["text"]
    text: str


class _FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: _FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _shape(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.content is None and not self.tool_calls:
            raise ValueError(f"a {self.role} message needs content")
        return self

    def as_template_dict(self) -> dict:
        """The message as transformers' apply_chat_template is given it (OpenAI's own dict; 'developer' is
        OpenAI's new name for 'system', which chat templates know)."""
        message = self.model_dump(exclude_none=True, by_alias=True)
        if self.role == "developer":
            message["role"] = "system"
        if isinstance(self.content, list):
            message["content"] = "".join(p.text for p in self.content)
        return message


class _Function(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: _Function


class _NamedFunction(_Strict):
    name: str


class _NamedTool(_Strict):
    type: Literal["function"]
    function: _NamedFunction


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: _Int | None = Field(default=None, ge=1)  # OpenAI's new name for max_tokens
    logprobs: bool = False
    top_logprobs: _Int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | _NamedTool | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _consistent(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_completion_tokens or max_tokens, not both")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, _NamedTool):
            names = [t.function.name for t in self.tools]
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not among the "
                                 f"tools ({', '.join(names)})")
        return self

    @property
    def tool_mode(self) -> str:
        """"none", "auto", "required", or the named function's name."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, _NamedTool):
            return self.tool_choice.function.name
        return self.tool_choice or "auto"

    @property
    def logprobs_k(self) -> int | None:
        """None: no logprobs; k: the chosen token's and the k most likely."""
        return (self.top_logprobs or 0) if self.logprobs else None


class TranslationRequest(_Strict):
    """POST /v1/translations (encoder-decoder models): one text, its languages (NLLB), beam size."""

    model: str | None = None
    text: str = Field(min_length=1)
    src_lang: str | None = None
    tgt_lang: str | None = None
    beams: _Int = Field(default=1, ge=1, le=16)
    max_tokens: _Int = Field(default=200, ge=1)
