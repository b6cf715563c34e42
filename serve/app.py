"""The OpenAI-compatible HTTP API over a loaded model: ``create_app(model, settings)`` returns a FastAPI app.

Decoder-only models serve /v1/completions and /v1/chat/completions (serve/decoder.py, continuous batching);
encoder-decoder models serve /v1/translations (serve/translation.py). Every refusal is an OpenAI-shaped error
({"error": {"message", "type", "param", "code"}}) with a 4xx/5xx status, and the server keeps serving. Before a
/v1 request's body is read, its API key is checked (401) and its size bounded (413).
"""

from __future__ import annotations

import secrets
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from ..runtime.errors import MoerunError
from .decoder import DecoderServing
from .protocol import ChatRequest, CompletionRequest, TranslationRequest
from .serving import APIError, Serving, error_body
from .settings import ServeSettings
from .translation import TranslationServing

__all__ = ["ServeSettings", "create_app"]


def _json_error(status: int, message: str, kind: str, code: str | None = None, headers: dict | None = None,
                param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, code, param), status, headers=headers)


class _Gate:
    """ASGI middleware for /v1/*: the API key from the headers first (401, nothing read), then the body read up to
    ``max_body_bytes`` (413 past it, by Content-Length or by counting), then handed to the app."""

    def __init__(self, app, serving: Serving) -> None:
        self.app = app
        self.serving = serving

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        settings = self.serving.settings
        headers = dict(scope["headers"])
        if settings.api_key is not None:
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {settings.api_key}".encode()):
                self.serving.metrics.rejected.labels("unauthorized").inc()
                return await _json_error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                         "authentication_error", "invalid_api_key")(scope, receive, send)
        limit = settings.max_body_bytes
        too_large = _json_error(413, f"the request body is larger than this server's {limit} bytes "
                                "(--max-body-mb)", "invalid_request_error", "request_too_large")
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            self.serving.metrics.rejected.labels("too_large").inc()
            return await too_large(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if len(body) > limit:
                self.serving.metrics.rejected.labels("too_large").inc()
                return await too_large(scope, receive, send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # what follows: a disconnect

        await self.app(scope, replay, send)


def _validation_message(e: RequestValidationError) -> tuple[str, str | None]:
    """(message, the field at fault): an unsupported field by its name."""
    errors = e.errors()
    for err in errors:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        if err.get("type") == "json_invalid":
            return f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})", None
        if err.get("type") == "extra_forbidden":
            return f"{where} is not supported by this server (moerun); leave it out", where
    parts = []
    for err in errors[:3]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        message = str(err.get("msg")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    first = ".".join(str(p) for p in errors[0].get("loc", ()) if p != "body") if errors else None
    return "invalid request: " + "; ".join(parts), first or None


def create_app(model, settings: ServeSettings | None = None) -> FastAPI:
    """The server for a loaded MoEModel (a DecoderModel or a Seq2SeqModel); its scheduler thread starts now."""
    settings = settings or ServeSettings()
    serving: Serving = (TranslationServing if model.manifest.is_seq2seq else DecoderServing)(model, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        serving.close()

    app = FastAPI(title="moerun", lifespan=lifespan)
    app.state.server = serving
    app.add_middleware(_Gate, serving=serving)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _json_error(e.status, e.message, e.kind, e.code, e.headers, e.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        serving.metrics.rejected.labels("invalid").inc()
        message, param = _validation_message(e)
        return _json_error(400, message, "invalid_request_error", param=param)

    @app.exception_handler(MoerunError)
    async def moerun_error(request: Request, e: MoerunError):
        serving.metrics.rejected.labels("invalid").inc()
        return _json_error(400, str(e), "invalid_request_error")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # 404 no such route, 405 wrong method, ...
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return _json_error(e.status_code, message.get(e.status_code, str(e.detail)), "invalid_request_error",
                           headers=getattr(e, "headers", None))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await serving.completions(request, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await serving.chat(request, body)

    @app.post("/v1/translations")
    async def translations(body: TranslationRequest, request: Request):
        return await serving.translate(request, body)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [serving.info()]}

    @app.get("/health")
    async def health():
        failure = serving.failure()
        if serving.draining or failure:
            status = "shutting down" if serving.draining else "error"
            return JSONResponse({"status": status, "reason": failure, **serving.info()}, 503)
        return {"status": "ok", **serving.info(), **serving.load()}

    @app.get("/metrics")
    async def metrics():
        return Response(serving.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app
