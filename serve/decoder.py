"""/v1/completions and /v1/chat/completions on a decoder-only model, through the Scheduler (continuous batching).

A request becomes n scheduler requests (its choices: the first is prefilled, the others take a copy of its KV
cache), each with a TokenPicker when it asks for more than temperature/top-p (a grammar from response_format or a
forced tool call, penalties, logit_bias, logprobs). Prompts are tokenized and chat templates rendered off the event
loop; a prompt with more characters than max_len tokens can hold is refused before it is tokenized.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
from fastapi.responses import JSONResponse, StreamingResponse

from ..runtime.errors import MoerunError
from ..runtime.generation import SamplingConfig
from ..runtime.grammar import lark_grammar, schema_grammar
from ..runtime.logits import LogitsOptions, TokenPicker
from .chat import load_chat_template
from .protocol import ChatRequest, CompletionRequest
from .scheduler import QueueFullError, Scheduler, SchedulerStoppedError
from .scheduler import Request as Generation
from .serving import APIError, Serving, error_body, usage
from .text import IncrementalText
from .tools import detect_tool_format

__all__ = ["DecoderServing"]

DISCONNECT_POLL_S = 0.5


@dataclass
class _Choice:
    index: int
    generation: Generation
    text: IncrementalText
    reason: str | None = None
    logprobs: list = field(default_factory=list)  # with logprobs: a Pick per token
    streamed: int = 0  # picks already streamed


class DecoderServing(Serving):
    def __init__(self, model, settings) -> None:
        super().__init__(model, settings)
        self.scheduler = Scheduler(model, settings.max_batch, settings.max_queue, settings.max_len, self.metrics)
        self.batching = self.scheduler.batching
        self.max_batch = self.scheduler.max_batch
        self.max_len = self.scheduler.max_len
        self.chat_template = load_chat_template(model.directory)
        self.tool_format = detect_tool_format(self.chat_template.source) if self.chat_template else None
        self.eos = frozenset(model.manifest.eos_token_id)
        # no token is longer than this many characters: a longer prompt has more than max_len tokens for sure
        self.max_prompt_chars = None
        if self.tokenizer is not None:
            longest = max(map(len, self.tokenizer._tok.get_vocab(with_added_tokens=True)), default=1)
            self.max_prompt_chars = self.max_len * max(longest, 1)

    def _wrong_endpoint(self) -> APIError:
        return self.reject(400, "invalid", f"{self.name} is a decoder-only model: use POST /v1/completions or "
                           "/v1/chat/completions")

    def close(self) -> None:
        super().close()
        self.scheduler.close()

    def failure(self) -> str | None:
        if self.draining or self.scheduler.alive:
            return None
        return self.scheduler.failure or "the scheduler thread stopped"

    def load(self) -> dict:
        return {"queue_depth": self.scheduler.waiting, "running": self.scheduler.busy}

    # --- endpoints -------------------------------------------------------------------------------

    async def completions(self, http, body: CompletionRequest):
        self.check(body.model)
        ids = await self._tokens(body.prompt, chat=False)
        return await self._generate(http, body, ids, chat=False)

    async def chat(self, http, body: ChatRequest):
        self.check(body.model)
        if self.chat_template is None:
            raise self.reject(400, "invalid", f"{self.name} has no chat template (tokenizer_config.json "
                              "chat_template or chat_template.jinja): use /v1/completions")
        tool_mode = body.tool_mode
        if tool_mode != "none" and self.tool_format is None:
            raise self.reject(400, "invalid", f"{self.name}'s chat template shows no tool-call format moerun reads "
                              "(Hermes <tool_call>, Mistral [TOOL_CALLS], harmony): tools are not served",
                              param="tools")
        messages = [m.as_template_dict() for m in body.messages]
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if tool_mode != "none" else None
        prompt = await asyncio.to_thread(self.chat_template.render, messages, tools)
        ids = await self._tokens(prompt, chat=True)
        return await self._generate(http, body, ids, chat=True, tool_mode=tool_mode, tools=tools)

    # --- the request ------------------------------------------------------------------------------

    async def _tokens(self, prompt: str | list[int], chat: bool) -> list[int]:
        vocab = self.model.manifest.vocab_size
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise self.reject(400, "invalid", f"{self.name} has no tokenizer.json: send the prompt as token ids")
            if len(prompt) > self.max_prompt_chars:
                raise self._too_long(f"the prompt ({len(prompt)} characters, more than {self.max_prompt_chars} "
                                     "can be)")
            # a rendered chat holds its own special tokens (apply_chat_template(tokenize=True) adds none)
            ids = await asyncio.to_thread(self.tokenizer.encode, prompt, not chat)
        else:
            ids = list(prompt)
            if any(not 0 <= i < vocab for i in ids):
                raise self.reject(400, "invalid", f"token ids must be in [0, {vocab})")
        if not ids:
            raise self.reject(400, "invalid", "the prompt has no tokens")
        return ids

    def _too_long(self, what: str, lower_to: int | None = None) -> APIError:
        hint = f"lower max_tokens to {lower_to} or shorten the prompt" if lower_to else "shorten the prompt"
        return self.reject(400, "too_long", f"{what} is more than this server's {self.max_len} tokens per request; "
                           f"{hint}", code="context_length_exceeded")

    def _max_tokens(self, body, ids: list[int], chat: bool) -> int:
        left = self.max_len - len(ids)
        # OpenAI's defaults: 16 for completions, the rest of the context for chat
        max_tokens = body.max_tokens if body.max_tokens is not None else (left if chat else min(16, left))
        if left < 1 or len(ids) + max_tokens > self.max_len:
            raise self._too_long(f"the prompt ({len(ids)} tokens) + max_tokens ({max_tokens})", max(left, 0))
        return max_tokens

    async def _grammar(self, body, tool_mode: str, tools: list[dict] | None):
        """The compiled grammar the request's output must follow, or None (compiled off the event loop)."""
        schema = body.response_format.schema if body.response_format is not None else None
        forced = tool_mode not in ("none", "auto")
        if schema is not None and forced:
            raise self.reject(400, "invalid", "response_format and a required or named tool_choice cannot both "
                              "shape the output", param="response_format")
        vocab, eos = self.model.runner.vocab, self.model.manifest.eos_token_id
        try:
            if schema is not None:
                return await asyncio.to_thread(schema_grammar, schema, self.tokenizer, vocab, eos)
            if forced:
                chosen = tools if tool_mode == "required" else [t for t in tools if t["function"]["name"] == tool_mode]
                special = {t: self.tokenizer.token_id(t) for t in self._special_tokens()}
                lark = self.tool_format.grammar(chosen, body.parallel_tool_calls and tool_mode == "required",
                                                {t: i for t, i in special.items() if i is not None})
                return await asyncio.to_thread(lark_grammar, lark, self.tokenizer, vocab, eos)
        except MoerunError as e:
            raise self.reject(400, "invalid", str(e), param="response_format" if schema else "tool_choice") from None
        return None

    def _special_tokens(self) -> list[str]:
        added = self.tokenizer._tok.get_added_tokens_decoder()
        return [token.content for token in added.values() if token.special]

    def _choices(self, body, ids: list[int], max_tokens: int, grammar, events: asyncio.Queue, loop,
                 capture_after: str | None) -> list[_Choice]:
        if body.n > self.max_batch:
            raise self.reject(400, "invalid", f"n ({body.n}) is more than this server's {self.max_batch} requests "
                              "decoded together (--max-batch)", param="n")
        greedy = body.temperature == 0
        options = LogitsOptions(body.presence_penalty, body.frequency_penalty, body.repetition_penalty,
                                body.token_bias, body.logprobs_k)
        skip_special = capture_after is None  # tool-call markers may be special tokens
        choices = []
        for index in range(body.n):
            seed = None if body.seed is None else body.seed + index  # choice i samples as seed + i alone
            try:
                sampling = SamplingConfig(do_sample=not greedy, temperature=1.0 if greedy else body.temperature,
                                          top_k=body.top_k, top_p=body.top_p, seed=seed)
            except MoerunError as e:
                raise self.reject(400, "invalid", str(e)) from None
            picker = None
            if grammar is not None or not options.plain:
                picker = TokenPicker(sampling, options, grammar.matcher() if grammar else None,
                                     np.random.default_rng(seed), ids)

            def emit(kind, value, index=index):
                loop.call_soon_threadsafe(events.put_nowait, (index, kind, value))

            generation = Generation(ids, max_tokens, sampling, emit, timeout=self.settings.timeout, picker=picker)
            text = IncrementalText(self.tokenizer, body.stops, skip_special_tokens=skip_special,
                                   capture_after=capture_after, skip_ids=self.eos)
            choices.append(_Choice(index, generation, text))
        choices[0].generation.copies = [c.generation for c in choices[1:]]
        return choices

    async def _generate(self, http, body, ids: list[int], chat: bool, tool_mode: str = "none",
                        tools: list[dict] | None = None):
        max_tokens = self._max_tokens(body, ids, chat)
        grammar = await self._grammar(body, tool_mode, tools)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        capture_after = self.tool_format.start if tool_mode != "none" else None
        choices = self._choices(body, ids, max_tokens, grammar, events, loop, capture_after)
        try:
            self.scheduler.submit(choices[0].generation)
        except QueueFullError as e:
            raise self.busy(str(e)) from None
        except SchedulerStoppedError:
            raise self.shutting_down() if self.draining else self.reject(
                503, "stopped", f"this server cannot generate: {self.failure()}", kind="server_error") from None
        reply = _Reply(self, body, chat, ids, choices, events, loop.time(), tool_mode)
        if body.stream:
            return StreamingResponse(reply.stream(), media_type="text/event-stream")
        try:
            await reply.collect(http)
        finally:
            reply.cancel()  # a no-op once finished; frees the slots when the client went away
        return JSONResponse(reply.response())


class _Reply:
    """One request's choices as their events arrive: OpenAI's response, or its server-sent events."""

    def __init__(self, serving: DecoderServing, body, chat: bool, ids: list[int], choices: list[_Choice],
                 events: asyncio.Queue, started: float, tool_mode: str) -> None:
        self.serving = serving
        self.body = body
        self.chat = chat
        self.prompt_tokens = len(ids)
        self.choices = choices
        self.events = events
        self.tool_mode = tool_mode
        timeout = serving.settings.timeout
        self.deadline = None if timeout is None else started + timeout + 1.0  # the scheduler's own check first
        self.head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(serving.created),
                     "model": serving.name}
        self.object = "chat.completion" if chat else "text_completion"

    def cancel(self) -> None:
        for choice in self.choices:
            choice.generation.cancel()

    @property
    def done(self) -> bool:
        return all(c.reason is not None for c in self.choices)

    async def _next(self, http=None) -> tuple[_Choice, str, bool]:
        """The next choice with news, its new text, and whether it has just ended; raises APIError on a timeout,
        a failure, a shutdown. ``http``: a client that goes away cancels the request (non-streaming: nobody would
        read the answer)."""
        loop = asyncio.get_running_loop()
        while True:
            wait = DISCONNECT_POLL_S if http is not None else None
            if self.deadline is not None:
                left = self.deadline - loop.time()
                if left <= 0:
                    raise self._timeout()
                wait = left if wait is None else min(wait, left)
            try:
                index, kind, value = await asyncio.wait_for(self.events.get(), wait)
            except TimeoutError:
                if http is not None and await http.is_disconnected():
                    self.cancel()
                    raise asyncio.CancelledError from None
                continue
            choice = self.choices[index]
            if choice.reason is not None:  # the end of a choice that a stop string ended already
                continue
            new = self._apply(choice, kind, value)
            return choice, new, choice.reason is not None

    def _apply(self, choice: _Choice, kind: str, value) -> str:
        if kind == "token":
            new = choice.text.add(value)
            picker = choice.generation.picker
            if picker is not None and picker.picks:
                choice.logprobs.append(picker.picks[len(choice.text.ids) - 1])
            if choice.text.stopped:
                choice.generation.cancel()
                choice.reason = "stop"
            return new
        if kind == "error":
            raise APIError(500, str(value), kind="server_error")
        if value == "timeout":
            raise self._timeout()
        if value == "shutdown":
            raise self.serving.shutting_down()
        choice.reason = "length" if value == "length" else "stop"
        return choice.text.flush()

    def _timeout(self) -> APIError:
        self.cancel()
        return self.serving.reject(504, "timeout", f"the request took longer than {self.serving.settings.timeout} s",
                                   kind="timeout")

    async def collect(self, http) -> None:
        try:
            while not self.done:
                await self._next(http)
        except asyncio.CancelledError:
            return

    # --- OpenAI's shapes --------------------------------------------------------------------------

    def _tool_calls(self, choice: _Choice) -> tuple[str | None, list[dict]]:
        text = choice.text.text + (choice.text.captured or "")
        if self.tool_mode == "none":
            return text, []
        return self.serving.tool_format.parse(text)

    def _finish_reason(self, choice: _Choice, calls: list) -> str:
        return "tool_calls" if calls else choice.reason

    def _logprobs(self, picks) -> dict:
        decode = self.serving.tokenizer.decode if self.serving.tokenizer is not None else (lambda ids: "")
        if self.chat:
            def entry(token, logprob):
                text = decode([token])
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
            return {"content": [{**entry(p.token, p.logprob), "top_logprobs": [entry(t, lp) for t, lp in p.top]}
                                for p in picks]}
        tokens = [decode([p.token]) for p in picks]
        offsets = np.cumsum([0, *map(len, tokens)])[:-1].tolist()
        return {"tokens": tokens, "token_logprobs": [p.logprob for p in picks],
                "top_logprobs": [{decode([t]): lp for t, lp in p.top} for p in picks], "text_offset": offsets}

    def response(self) -> dict:
        out = []
        for choice in self.choices:
            entry = {"index": choice.index, "token_ids": choice.text.ids}
            logprobs = self._logprobs(choice.logprobs) if self.body.logprobs_k is not None else None
            if self.chat:
                content, calls = self._tool_calls(choice)
                message = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"] = calls
                entry.update(message=message, logprobs=logprobs, finish_reason=self._finish_reason(choice, calls))
            else:
                entry.update(text=choice.text.text, logprobs=logprobs, finish_reason=choice.reason)
            out.append(entry)
        return {**self.head, "object": self.object, "choices": out, "usage": self.usage()}

    def usage(self) -> dict:
        return usage(self.prompt_tokens, sum(len(c.text.ids) for c in self.choices))

    def _chunk(self, choice: _Choice, new: str, reason: str | None, first: bool = False,
               calls: list | None = None) -> str:
        picks = choice.logprobs[choice.streamed:]
        choice.streamed = len(choice.logprobs)
        logprobs = self._logprobs(picks) if self.body.logprobs_k is not None and picks else None
        if self.chat:
            delta = {"role": "assistant", "content": new} if first else ({"content": new} if new else {})
            if calls:
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
            body = {"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        else:
            body = {"index": choice.index, "text": new, "logprobs": logprobs, "finish_reason": reason}
        return _event({**self.head, "object": f"{self.object}.chunk" if self.chat else self.object,
                       "choices": [body]})

    async def stream(self) -> AsyncIterator[str]:
        """Server-sent events as OpenAI streams them; closing the stream (a disconnect) cancels the request."""
        try:
            if self.chat:
                for choice in self.choices:
                    yield self._chunk(choice, "", None, first=True)
            while not self.done:
                choice, new, ended = await self._next()
                if not ended:
                    if new or len(choice.logprobs) > choice.streamed:
                        yield self._chunk(choice, new, None)
                    continue
                calls = []
                if self.chat and self.tool_mode != "none":
                    content, calls = self._tool_calls(choice)
                    if not calls and choice.text.captured:  # no call parsed: the held text is content after all
                        new += choice.text.captured
                yield self._chunk(choice, new, self._finish_reason(choice, calls), calls=calls)
        except APIError as e:
            yield _event(error_body(e.message, e.kind, e.code))
        finally:
            self.cancel()
        if self.body.stream_options is not None and self.body.stream_options.include_usage:
            yield _event({**self.head, "object": f"{self.object}.chunk" if self.chat else self.object,
                          "choices": [], "usage": self.usage()})
        yield "data: [DONE]\n\n"


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"
