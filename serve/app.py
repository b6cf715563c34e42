"""The OpenAI-compatible HTTP API over a loaded model: ``create_app(model, settings)`` returns a FastAPI app.

Decoder-only models serve /v1/completions and /v1/chat/completions through the Scheduler (continuous batching);
encoder-decoder models serve /v1/translations one request at a time. Every refusal is an OpenAI-shaped error
({"error": {"message", "type", "code"}}) with a 4xx/5xx status, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..runtime.errors import MoerunError
from ..runtime.generation import SamplingConfig
from .chat import load_chat_template
from .metrics import ServeMetrics
from .protocol import ChatRequest, CompletionRequest, TranslationRequest
from .scheduler import QueueFullError, Scheduler
from .scheduler import Request as Generation
from .settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]

RETRY_AFTER_S = 1


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers


def _error(status: int, message: str, kind: str, code: str | None = None, headers: dict | None = None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status,
                        headers=headers)


class _Text:
    """Token ids to text as they arrive: only whole characters (no half UTF-8 sequence), and text that could be
    the start of a stop string is held back until it is known not to be one."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer, self.stops, self.ids, self.text, self.sent, self.stopped = tokenizer, stops, [], "", 0, False

    def add(self, token: int) -> str:
        self.ids.append(token)
        if self.tokenizer is None:
            return ""
        self.text = self.tokenizer.decode(self.ids)
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self.flush()
        safe = len(self.text) - 1 if self.text.endswith("\ufffd") else len(self.text)
        # the longest tail that begins a stop string stays back
        held = [n for stop in self.stops for n in range(1, min(len(stop) - 1, safe - self.sent) + 1)
                if self.text[safe - n: safe] == stop[:n]]
        return self._emit(safe - max(held, default=0))

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.sent)
        new, self.sent = self.text[self.sent: upto], upto
        return new


class _Server:
    """What the routes share: the model, its scheduler (or translation worker), metrics and settings."""

    def __init__(self, model, settings: ServeSettings) -> None:
        self.model, self.settings = model, settings
        self.name = settings.model_name or model.directory.name
        self.metrics = ServeMetrics()
        self.tokenizer = model.tokenizer
        self.seq2seq = model.manifest.is_seq2seq
        self.created = int(time.time())
        if self.seq2seq:
            self.scheduler = None
            self.translator = ThreadPoolExecutor(1, thread_name_prefix="moerun-translate")
            self.pending, self.lock = 0, threading.Lock()
            self.batching, self.max_len = "one at a time", model.manifest.max_positions
        else:
            self.scheduler = Scheduler(model, settings.max_batch, settings.max_queue, settings.max_len, self.metrics)
            self.batching, self.max_len = self.scheduler.batching, self.scheduler.max_len
            self.chat_template = load_chat_template(model.directory)

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
        else:
            self.translator.shutdown(wait=False, cancel_futures=True)

    def reject(self, status: int, reason: str, message: str, **kwargs) -> APIError:
        self.metrics.rejected.labels(reason).inc()
        return APIError(status, message, **kwargs)

    def check_model(self, name: str) -> None:
        if name != self.name:
            raise self.reject(404, "unknown_model", f"model {name!r} does not exist; this server serves "
                              f"{self.name!r} (GET /v1/models)", code="model_not_found")

    def info(self) -> dict:
        m = self.model.manifest
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "moerun",
                "architecture": m.architecture, "kind": m.kind, "attention": m.attention,
                "batching": self.batching, "max_batch": 1 if self.scheduler is None else self.scheduler.max_batch,
                "max_model_len": self.max_len, "provider": self.model.execution_provider}

    def load(self) -> dict:
        if self.scheduler is not None:
            return {"queue_depth": self.scheduler.waiting, "running": self.scheduler.busy}
        with self.lock:
            return {"queue_depth": max(self.pending - 1, 0), "running": min(self.pending, 1)}

    # --- decoder-only generation ------------------------------------------------------------------

    def prepare(self, body, prompt: str | list[int], chat: bool) -> Generation:
        """The scheduler request for a checked body: 400 for what cannot run, with the limits."""
        self.check_model(body.model)
        if self.seq2seq:
            raise self.reject(400, "invalid", f"{self.name} is an encoder-decoder model: use POST /v1/translations")
        vocab = self.model.manifest.vocab_size
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise self.reject(400, "invalid", f"{self.name} has no tokenizer.json: send the prompt as token ids")
            # a rendered chat holds its own special tokens (apply_chat_template(tokenize=True) adds none)
            ids = self.tokenizer.encode(prompt, add_special_tokens=not chat)
        else:
            ids = list(prompt)
            if any(not 0 <= i < vocab for i in ids):
                raise self.reject(400, "invalid", f"token ids must be in [0, {vocab})")
        if not ids:
            raise self.reject(400, "invalid", "the prompt has no tokens")
        room = self.max_len - len(ids)
        max_tokens = body.max_tokens if body.max_tokens is not None else (
            min(16, room) if not chat else room)  # OpenAI's defaults: 16 for completions, the rest for chat
        if room < 1 or len(ids) + max_tokens > self.max_len:
            raise self.reject(400, "too_long", f"the prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) is more "
                              f"than this server's {self.max_len} tokens per request; lower max_tokens to "
                              f"{max(room, 0)} or shorten the prompt", code="context_length_exceeded")
        greedy = body.temperature == 0
        sampling = SamplingConfig(do_sample=not greedy, temperature=1.0 if greedy else body.temperature,
                                  top_p=body.top_p, seed=body.seed)
        return Generation(ids, max_tokens, sampling, emit=None, timeout=self.settings.timeout)

    async def run(self, http: Request, body, prompt, chat: bool) -> Response:
        generation = self.prepare(body, prompt, chat)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        generation.emit = lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value))
        try:
            self.scheduler.submit(generation)
        except QueueFullError as e:
            raise self.reject(503, "queue_full", str(e), kind="server_busy",
                              headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.name}
        text = _Text(self.tokenizer, body.stops)
        if body.stream:
            return StreamingResponse(self._stream(body, generation, events, text, head, chat),
                                     media_type="text/event-stream")
        try:
            reason = await self._collect(http, generation, events, text)
        finally:
            generation.cancel()  # a no-op once finished; frees the slot when the client went away
        n_prompt, n_new = len(generation.prompt), len(text.ids)
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}
        choice = {"index": 0, "finish_reason": reason, "token_ids": text.ids}
        if chat:
            choice["message"] = {"role": "assistant", "content": text.text}
        else:
            choice.update(text=text.text, logprobs=None)
        return JSONResponse({**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                             "usage": usage})

    async def _events(self, generation: Generation, events: asyncio.Queue, text: _Text):
        """(new text, finish reason or None) per token, until the request finishes; raises APIError on a timeout
        or a failure. A stop string cancels the request (its slot is freed at the next step)."""
        while True:
            kind, value = await events.get()
            if kind == "token":
                new = text.add(value)
                if text.stopped:
                    generation.cancel()
                    yield new, "stop"
                    return
                yield new, None
            elif kind == "finish":
                if value == "timeout":
                    raise self.reject(504, "timeout", f"the request took longer than {self.settings.timeout} s",
                                      kind="timeout")
                yield text.flush(), "length" if value == "length" else "stop"
                return
            else:
                raise APIError(500, str(value), kind="server_error")

    async def _collect(self, http: Request, generation: Generation, events: asyncio.Queue, text: _Text) -> str:
        """The finish reason, once every token is in; a client that disconnects cancels the request."""
        stream = self._events(generation, events, text)
        while True:
            task = asyncio.ensure_future(anext(stream))
            while not task.done():
                await asyncio.wait([task], timeout=0.5)
                if not task.done() and await http.is_disconnected():
                    task.cancel()
                    generation.cancel()
                    return "cancelled"  # nobody reads the response
            _, reason = task.result()
            if reason is not None:
                return reason

    async def _stream(self, body, generation: Generation, events: asyncio.Queue, text: _Text, head: dict,
                      chat: bool) -> AsyncIterator[str]:
        """Server-sent events as OpenAI streams them; closing the stream (a disconnect) cancels the request."""
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(new: str, reason: str | None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": new} if first else ({"content": new} if new else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": new, "logprobs": None, "finish_reason": reason}
            return f"data: {json.dumps({**head, 'object': obj, 'choices': [choice]})}\n\n"

        try:
            if chat:
                yield chunk("", None, first=True)
            async for new, reason in self._events(generation, events, text):
                if new or reason:
                    yield chunk(new, reason)
        except APIError as e:
            yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind, 'code': e.code}})}\n\n"
        finally:
            generation.cancel()
        if body.stream_options is not None and body.stream_options.include_usage:
            n_prompt, n_new = len(generation.prompt), len(text.ids)
            usage = {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}
            yield f"data: {json.dumps({**head, 'object': obj, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    # --- encoder-decoder translation --------------------------------------------------------------

    async def translate(self, body: TranslationRequest) -> dict:
        self.check_model(body.model)
        if not self.seq2seq:
            raise self.reject(400, "invalid", f"{self.name} is a decoder-only model: use POST /v1/completions or "
                              "/v1/chat/completions")
        if self.tokenizer is None:
            raise self.reject(400, "invalid", f"{self.name} has no tokenizer.json: it cannot translate text")
        with self.lock:
            if self.pending >= self.settings.max_queue + 1:
                raise self.reject(503, "queue_full", f"{self.settings.max_queue} requests are already waiting; "
                                  "retry shortly", kind="server_busy", headers={"Retry-After": str(RETRY_AFTER_S)})
            self.pending += 1
            self.metrics.queue_depth.set(self.pending - 1)
        start = time.monotonic()
        try:
            def work():
                self.metrics.running.set(1)
                try:
                    out = self.model.translate(body.text, body.src_lang, body.tgt_lang, num_beams=body.beams,
                                               max_new_tokens=body.max_tokens)
                    return out, self.model.last_stats
                finally:
                    self.metrics.running.set(0)

            text, stats = await asyncio.get_running_loop().run_in_executor(self.translator, work)
        except MoerunError as e:
            raise self.reject(400, "invalid", str(e)) from None
        finally:
            with self.lock:
                self.pending -= 1
                self.metrics.queue_depth.set(max(self.pending - 1, 0))
        self.metrics.latency.observe(time.monotonic() - start)
        self.metrics.tokens.inc(stats.decode_tokens)
        return {"id": f"tr-{uuid.uuid4().hex}", "object": "translation", "created": int(time.time()),
                "model": self.name, "text": text,
                "usage": {"prompt_tokens": stats.prefill_tokens, "completion_tokens": stats.decode_tokens,
                          "total_tokens": stats.prefill_tokens + stats.decode_tokens}}


def _validation_message(e: RequestValidationError) -> str:
    parts = []
    for err in e.errors()[:3]:
        if err.get("type") == "json_invalid":
            return f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})"
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "invalid request: " + "; ".join(parts)


def create_app(model, settings: ServeSettings | None = None) -> FastAPI:
    """The server for a loaded MoEModel (a DecoderModel or a Seq2SeqModel); its scheduler thread starts now."""
    from contextlib import asynccontextmanager

    server = _Server(model, settings or ServeSettings())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.close()

    app = FastAPI(title="moerun", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _error(e.status, e.message, e.kind, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        server.metrics.rejected.labels("invalid").inc()
        return _error(400, _validation_message(e), "invalid_request_error")

    @app.exception_handler(MoerunError)
    async def moerun_error(request: Request, e: MoerunError):
        server.metrics.rejected.labels("invalid").inc()
        return _error(400, str(e), "invalid_request_error")

    def authorized(request: Request) -> None:
        key = server.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise server.reject(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                kind="authentication_error", code="invalid_api_key")

    auth = [Depends(authorized)]

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        return await server.run(request, body, body.prompt, chat=False)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatRequest, request: Request):
        server.check_model(body.model)
        if server.seq2seq or server.chat_template is None:
            raise server.reject(400, "invalid", f"{server.name} has no chat template (tokenizer_config.json "
                                "chat_template or chat_template.jinja): use /v1/completions")
        prompt = server.chat_template.render([m.as_template_dict() for m in body.messages])
        return await server.run(request, body, prompt, chat=True)

    @app.post("/v1/translations", dependencies=auth)
    async def translations(body: TranslationRequest):
        return await server.translate(body)

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [server.info()]}

    @app.get("/health")
    async def health():
        return {"status": "ok", **server.info(), **server.load()}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app
