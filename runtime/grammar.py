"""Constrained decoding: a JSON schema (or a Lark grammar) compiled by llguidance into a per-sequence matcher that
gives, before each token, the set of tokens the grammar allows, and is told the token picked.

llguidance (the `serve` extra) is the library onnxruntime-genai, llama.cpp and vLLM use; it needs no torch. It is
imported on first use, so the runtime works without it until a request asks for a grammar.
"""

from __future__ import annotations

import json
import threading

import numpy as np

from .errors import MoerunError, RequestError

__all__ = ["Grammar", "GrammarMatcher", "lark_grammar", "response_schema", "schema_grammar"]

_TOKENIZERS: dict[int, object] = {}  # id(our Tokenizer) -> llguidance's view of it (~1 s to build at 150k tokens)
_LOCK = threading.Lock()


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise MoerunError("constrained decoding (response_format, tool_choice) needs llguidance: "
                          "pip install 'moerun[serve]'") from None
    return llguidance


def response_schema(response_format: dict) -> dict:
    """The JSON schema an OpenAI ``response_format`` asks for: ``{"type": "json_object"}`` any JSON object,
    ``{"type": "json_schema", "json_schema": {"schema": ...}}`` that schema; any other dict is taken as a schema."""
    if not isinstance(response_format, dict):
        raise RequestError(f"response_format must be a dict, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise RequestError("response_format json_schema needs json_schema.schema, a JSON schema object")
        return schema
    return response_format


class Grammar:
    """A compiled grammar for one tokenizer and vocabulary; ``matcher()`` starts a sequence on it."""

    def __init__(self, grammar: str, tokenizer, vocab_size: int, eos_token_ids: list[int]) -> None:
        llg = _llguidance()
        self.vocab_size = vocab_size
        self._tokenizer = _ll_tokenizer(llg, tokenizer, vocab_size, eos_token_ids)
        error = llg.LLMatcher.validate_grammar(grammar, self._tokenizer)
        if error:
            raise RequestError(f"the grammar cannot be compiled: {error.splitlines()[0]}")
        self._grammar = grammar

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(_llguidance().LLMatcher(self._tokenizer, self._grammar, log_level=0), self.vocab_size)


def schema_grammar(schema: dict, tokenizer, vocab_size: int, eos_token_ids: list[int]) -> Grammar:
    """JSON text that validates against ``schema`` (strict: no properties the schema does not name, unless it
    allows them; whitespace as compact JSON writes it)."""
    llg = _llguidance()
    try:
        text = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                      defaults={"whitespace_flexible": False})
    except (ValueError, TypeError) as e:
        raise RequestError(f"the JSON schema cannot be used: {e}") from None
    return Grammar(text, tokenizer, vocab_size, eos_token_ids)


def lark_grammar(lark: str, tokenizer, vocab_size: int, eos_token_ids: list[int]) -> Grammar:
    """A Lark grammar in llguidance's dialect (``%json {schema}`` embeds a JSON schema)."""
    try:
        text = _llguidance().LLMatcher.grammar_from_lark(lark)
    except ValueError as e:
        raise RequestError(f"the grammar cannot be used: {e}") from None
    return Grammar(text, tokenizer, vocab_size, eos_token_ids)


class GrammarMatcher:
    """One sequence's position in a grammar."""

    def __init__(self, matcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._bitmask = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)

    def allowed(self) -> np.ndarray:
        """A bool per token of the vocabulary: what the grammar allows next (EOS once it is complete)."""
        self._matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        self._check()
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")
        return bits[: self.vocab_size].astype(bool)

    def consume(self, token: int) -> None:
        if self._matcher.is_stopped():  # the EOS after a complete grammar
            return
        self._matcher.consume_token(int(token))
        self._check()

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more (the sequence ends here)."""
        return self._matcher.is_stopped()

    def _check(self) -> None:
        if self._matcher.is_error():
            raise RequestError(f"constrained decoding failed: {self._matcher.get_error()}")


def _ll_tokenizer(llg, tokenizer, vocab_size: int, eos_token_ids: list[int]):
    """llguidance's tokenizer for our Tokenizer (built once per tokenizer and vocabulary: it indexes every token)."""
    if tokenizer is None:
        raise RequestError("constrained decoding needs the model's tokenizer.json")
    key = (id(tokenizer), vocab_size)
    with _LOCK:
        cached = _TOKENIZERS.get(key)
        if cached is None or cached[0] is not tokenizer:
            # JSON's slices: the token classes llguidance precomputes for JSON strings and numbers (measured: the
            # mask 2x faster than with its general slices at 151,936 tokens, docs/bench_structured.md)
            built = llg.LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size, eos_token=list(eos_token_ids) or None,
                                    slices=llg.LLTokenizer.json_slices())
            cached = _TOKENIZERS[key] = (tokenizer, built)
    return cached[1]
