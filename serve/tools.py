"""Tool calls in the text formats the supported families' chat templates teach their models, read off the template:

- Hermes-style (Qwen2.5/Qwen3/Qwen3-MoE, many others): per call,
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``;
- Mistral: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``;
- GPT-OSS harmony: ``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>`` per call.

Each format parses the model's text into OpenAI ``tool_calls`` and writes the grammar (llguidance's Lark dialect,
``%json`` embedding each tool's parameter schema) that forces one when ``tool_choice`` is "required" or names a
function, so that the arguments always parse and validate.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

__all__ = ["TOOL_FORMATS", "ToolFormat", "detect_tool_format"]


def _call_schema(tool: dict) -> dict:
    function = tool["function"]
    return {"type": "object", "properties": {"name": {"const": function["name"]},
                                              "arguments": function.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}


def _compact(schema: dict) -> dict:
    """The schema with llguidance's option for compact JSON (no free whitespace a model could write forever)."""
    return {**schema, "x-guidance": {"whitespace_flexible": False}}


def _literal(text: str, special_ids: dict[str, int]) -> str:
    """A Lark literal for ``text``; a special token by its id (llguidance's ``<[id]>``), which text cannot spell."""
    if text in special_ids:
        return f"<[{special_ids[text]}]>"
    return json.dumps(text)


@dataclass(frozen=True)
class ToolFormat:
    name: str
    start: str  # the text that opens the model's tool calls

    def grammar(self, tools: list[dict], parallel: bool, special_ids: dict[str, int]) -> str:
        """A Lark grammar: one tool call (``parallel``: one or more) of the given tools, nothing else."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(content before the calls or None, OpenAI tool_calls) from the model's text; no calls: (text, [])."""
        raise NotImplementedError


def _openai_call(name: str, arguments) -> dict:
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _content(text: str) -> str | None:
    return text if text.strip() else None


class _Hermes(ToolFormat):
    _CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)

    def grammar(self, tools, parallel, special_ids):
        calls = " | ".join(f"%json {json.dumps(_compact(_call_schema(t)))}" for t in tools)
        repeat = "+" if parallel else ""
        return (f"start: call{repeat}\ncall: {_literal('<tool_call>', special_ids)} \"\\n\" body \"\\n\" "
                f"{_literal('</tool_call>', special_ids)}\nbody: {calls}\n")

    def parse(self, text):
        at = text.find(self.start)
        if at < 0:
            return text, []
        calls = []
        for match in self._CALL.finditer(text, at):
            try:
                call = json.loads(match.group(1))
            except ValueError:
                continue
            if isinstance(call, dict) and isinstance(call.get("name"), str):
                calls.append(_openai_call(call["name"], call.get("arguments", {})))
        return (_content(text[:at]), calls) if calls else (text, [])


class _Mistral(ToolFormat):
    def grammar(self, tools, parallel, special_ids):
        item = {"anyOf": [_call_schema(t) for t in tools]} if len(tools) > 1 else _call_schema(tools[0])
        array = {"type": "array", "items": item, "minItems": 1, **({} if parallel else {"maxItems": 1})}
        return f"start: {_literal('[TOOL_CALLS]', special_ids)} body\nbody: %json {json.dumps(_compact(array))}\n"

    def parse(self, text):
        at = text.find(self.start)
        if at < 0:
            return text, []
        try:
            calls, _ = json.JSONDecoder().raw_decode(text[at + len(self.start):].lstrip())
        except ValueError:
            return text, []
        calls = [c for c in (calls if isinstance(calls, list) else [calls])
                 if isinstance(c, dict) and isinstance(c.get("name"), str)]
        if not calls:
            return text, []
        return _content(text[:at]), [_openai_call(c["name"], c.get("arguments", {})) for c in calls]


class _Harmony(ToolFormat):
    _CALL = re.compile(r"to=functions\.([\w-]+)[^<]*(?:<\|constrain\|>\s*json)?\s*<\|message\|>(.*?)"
                       r"(?:<\|call\|>|$)", re.DOTALL)

    def grammar(self, tools, parallel, special_ids):
        def call(tool):
            head = (f"{_literal('<|channel|>', special_ids)} \"commentary to=functions.{tool['function']['name']} \" "
                    f"{_literal('<|constrain|>', special_ids)} \"json\" {_literal('<|message|>', special_ids)}")
            parameters = _compact(tool["function"].get("parameters") or {"type": "object"})
            return f"{head} %json {json.dumps(parameters)} " \
                   f"{_literal('<|call|>', special_ids)}"
        return f"start: {' | '.join(f'({call(t)})' for t in tools)}\n"

    def parse(self, text):
        calls = []
        for match in self._CALL.finditer(text):
            try:
                arguments = json.loads(match.group(2))
            except ValueError:
                continue
            calls.append(_openai_call(match.group(1), arguments))
        if not calls:
            return text, []
        final = text.rsplit("<|channel|>final<|message|>", 1)
        return (_content(final[1]) if len(final) == 2 else None), calls


TOOL_FORMATS = {"hermes": _Hermes("hermes", "<tool_call>"), "mistral": _Mistral("mistral", "[TOOL_CALLS]"),
                "harmony": _Harmony("harmony", "to=functions.")}


def detect_tool_format(template_source: str) -> ToolFormat | None:
    """The tool-call format a chat template teaches its model, or None when it shows none moerun reads."""
    if "<tool_call>" in template_source:
        return TOOL_FORMATS["hermes"]
    if "[TOOL_CALLS]" in template_source:
        return TOOL_FORMATS["mistral"]
    if "to=functions." in template_source or "<|channel|>" in template_source:
        return TOOL_FORMATS["harmony"]
    return None
