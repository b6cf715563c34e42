"""/v1/translations on an encoder-decoder model: one translation at a time on a worker thread (beam search with batch
pruning, runtime.search). A request's max_tokens is bounded by the model's positions; its time (--timeout) and its
client's disconnect stop its search between decoder steps."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from ..runtime.errors import MoerunError, RequestCancelledError
from .protocol import TranslationRequest
from .scheduler import DEFAULT_MAX_LEN
from .serving import APIError, Serving, usage

__all__ = ["TranslationServing"]

DISCONNECT_POLL_S = 0.5


class TranslationServing(Serving):
    batching = "one at a time"

    def __init__(self, model, settings) -> None:
        super().__init__(model, settings)
        self.max_len = model.manifest.max_positions or DEFAULT_MAX_LEN
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="moerun-translate")
        self.pending = 0
        self.lock = threading.Lock()
        self.stops: set[threading.Event] = set()  # one per request in the worker's hands or queue

    def _wrong_endpoint(self) -> APIError:
        return self.reject(400, "invalid", f"{self.name} is an encoder-decoder model: use POST /v1/translations")

    def close(self) -> None:
        super().close()
        for stop in list(self.stops):
            stop.set()
        self.worker.shutdown(wait=False, cancel_futures=True)

    def load(self) -> dict:
        with self.lock:
            return {"queue_depth": max(self.pending - 1, 0), "running": min(self.pending, 1)}

    async def translate(self, http, body: TranslationRequest) -> dict:
        self.check(body.model)
        if self.tokenizer is None:
            raise self.reject(400, "invalid", f"{self.name} has no tokenizer.json: it cannot translate text")
        # the decoder's start token takes one position
        if body.max_tokens > self.max_len - 1:
            raise self.reject(400, "too_long", f"max_tokens ({body.max_tokens}) is more than this model's "
                              f"{self.max_len - 1} decoder positions after the start token; lower it",
                              code="context_length_exceeded", param="max_tokens")
        with self.lock:
            if self.pending >= self.settings.max_queue + 1:
                raise self.busy(f"{self.settings.max_queue} requests are already waiting; retry shortly")
            self.pending += 1
            self.metrics.queue_depth.set(self.pending - 1)
        start = time.monotonic()
        stop = threading.Event()
        self.stops.add(stop)
        try:
            future = asyncio.get_running_loop().run_in_executor(self.worker, self._work, body, stop)
            text, stats = await self._wait(http, future, stop, start)
        finally:
            stop.set()
            self.stops.discard(stop)
            with self.lock:
                self.pending -= 1
                self.metrics.queue_depth.set(max(self.pending - 1, 0))
        self.metrics.latency.observe(time.monotonic() - start)
        self.metrics.tokens.inc(stats.decode_tokens)
        return {"id": f"tr-{uuid.uuid4().hex}", "object": "translation", "created": int(time.time()),
                "model": self.name, "text": text, "usage": usage(stats.prefill_tokens, stats.decode_tokens)}

    def _work(self, body: TranslationRequest, stop: threading.Event):
        if stop.is_set():
            raise RequestCancelledError("stopped before it started")
        self.metrics.running.set(1)
        try:
            out = self.model.translate(body.text, body.src_lang, body.tgt_lang, num_beams=body.beams,
                                       max_new_tokens=body.max_tokens, should_stop=stop.is_set)
            return out, self.model.last_stats
        finally:
            self.metrics.running.set(0)

    async def _wait(self, http, future, stop: threading.Event, start: float):
        """The worker's result; a timeout (504), a disconnect or a shutdown (503) stops the search."""
        timeout = self.settings.timeout
        while True:
            wait = DISCONNECT_POLL_S
            if timeout is not None:
                wait = min(wait, max(timeout - (time.monotonic() - start), 0.0))
            done, _ = await asyncio.wait([future], timeout=wait)
            if done:
                try:
                    return future.result()
                except RequestCancelledError:
                    if self.draining:
                        raise self.shutting_down() from None
                    raise self._timed_out() from None
                except MoerunError as e:
                    raise self.reject(400, "invalid", str(e)) from None
            if self.draining:
                stop.set()
                raise self.shutting_down()
            if timeout is not None and time.monotonic() - start >= timeout:
                stop.set()
                raise self._timed_out()
            if await http.is_disconnected():
                stop.set()
                raise APIError(499, "the client closed the request")  # nobody reads it

    def _timed_out(self) -> APIError:
        return self.reject(504, "timeout", f"the request took longer than {self.settings.timeout} s", kind="timeout")
