"""What every serving class shares (one per kind of model, over one engine, as vLLM's OpenAI entrypoints): the
model's name, metrics, limits, the OpenAI error shape, health; and the endpoints the other kind serves, refused."""

from __future__ import annotations

import time

from .metrics import ServeMetrics
from .settings import ServeSettings

__all__ = ["APIError", "Serving", "error_body", "usage"]

RETRY_AFTER_S = 1


class APIError(Exception):
    """An answer other than 200, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.headers = headers
        self.param = param


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Serving:
    """The interface the routes call. Subclasses serve their endpoints and leave the others to these refusals."""

    batching = ""
    max_batch = 1

    def __init__(self, model, settings: ServeSettings) -> None:
        self.model = model
        self.settings = settings
        self.name = settings.model_name or model.directory.name
        self.metrics = ServeMetrics()
        self.tokenizer = model.tokenizer
        self.created = int(time.time())
        self.max_len = model.manifest.max_positions
        self.draining = False  # shutting down: every request is answered 503

    # --- endpoints ---------------------------------------------------------------------------------

    async def completions(self, http, body):
        raise self._wrong_endpoint()

    async def chat(self, http, body):
        raise self._wrong_endpoint()

    async def translate(self, http, body):
        raise self._wrong_endpoint()

    def _wrong_endpoint(self) -> APIError:
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Shutdown: running and new requests are answered 503."""
        self.draining = True

    def failure(self) -> str | None:
        """Why this server cannot serve (its worker stopped), or None."""
        return None

    def reject(self, status: int, reason: str, message: str, **kwargs) -> APIError:
        self.metrics.rejected.labels(reason).inc()
        return APIError(status, message, **kwargs)

    def shutting_down(self) -> APIError:
        return self.reject(503, "shutdown", "the server is shutting down; retry on another replica",
                           kind="server_busy", code="shutting_down")

    def busy(self, message: str) -> APIError:
        return self.reject(503, "queue_full", message, kind="server_busy", headers={"Retry-After": str(RETRY_AFTER_S)})

    def check(self, model_name: str | None) -> None:
        """Before any work: not shutting down, and the model asked for (if named) is this one."""
        if self.draining:
            raise self.shutting_down()
        if model_name is not None and model_name != self.name:
            raise self.reject(404, "unknown_model", f"model {model_name!r} does not exist; this server serves "
                              f"{self.name!r} (GET /v1/models)", code="model_not_found")

    def info(self) -> dict:
        m = self.model.manifest
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "moerun",
                "architecture": m.architecture, "kind": m.kind, "attention": m.attention,
                "batching": self.batching, "max_batch": self.max_batch, "max_model_len": self.max_len,
                "provider": self.model.execution_provider}

    def load(self) -> dict:
        raise NotImplementedError
