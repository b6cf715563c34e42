"""The checkpoint's chat template, rendered with jinja2 as transformers' ``apply_chat_template`` renders it (without
importing transformers, which imports torch): the same sandboxed environment, filters, globals and variables."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..runtime.errors import ModelDirError, RequestError

__all__ = ["ChatTemplate", "load_chat_template"]


# transformers' special_tokens_map: what apply_chat_template passes to the template
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: no HTML escaping, its options exposed
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _Generation(jinja2.ext.Extension):
    """transformers' {% generation %} block (it marks assistant tokens); rendering keeps its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Sandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox, except that reaching an unsafe attribute (``__globals__``, ``__class__``, ...) refuses the
    template instead of rendering it as an empty string."""

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} object is unsafe")


class ChatTemplate:
    """A compiled chat template with the tokenizer's special tokens (bos_token, eos_token, ...) as variables."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        env = _Sandbox(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_Generation, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.template = env.from_string(source)
        self.source = source
        self.special_tokens = special_tokens

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True) -> str:
        """The prompt for ``messages`` (OpenAI's dicts) and ``tools`` (OpenAI's function tools, passed as
        transformers passes JSON-schema tools: unchanged)."""
        try:
            return self.template.render(messages=messages, tools=tools or None, documents=None,
                                        add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise RequestError(f"the chat template refused these messages: {e}") from None


def load_chat_template(directory: Path) -> ChatTemplate | None:
    """The template from chat_template.jinja (transformers 5 saves it there) or tokenizer_config.json's
    chat_template (a string, or a list of named templates: "default"); None when the model has none."""
    directory = Path(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    source = config.get("chat_template")
    if (directory / "chat_template.jinja").is_file():
        source = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(source, list):
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    if source is None:
        return None
    if not isinstance(source, str):
        raise ModelDirError(f"{config_path}: chat_template is not a string")
    special = {}
    for key in _SPECIAL_TOKENS:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[key] = value
    try:
        return ChatTemplate(source, special)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ModelDirError(f"{directory}: the chat template is not valid jinja ({e})") from None
