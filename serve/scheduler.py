"""Continuous batching: one thread owns the ONNX Runtime session; requests join the running decode batch at step
boundaries and leave when finished. No web code: results go back through each request's ``emit`` callback."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..runtime.errors import MoerunError
from ..runtime.generation import SamplingConfig, pick_next
from ..runtime.logits import TokenPicker
from .engine import make_engine
from .metrics import ServeMetrics

__all__ = ["QueueFullError", "Request", "Scheduler", "SchedulerStoppedError"]

log = logging.getLogger(__name__)

PREFILL_TOKENS = 2048  # padded tokens in one prefill run of requests joining together
# Slot length when --max-len is not given: the model's positions, at most this. Every slot holds max_len positions
# of every layer's KV cache, allocated at start (Mixtral-8x7B at its 32k positions: 4.3 GB per slot in fp16).
DEFAULT_MAX_LEN = 4096
# Requests that arrive close together are prefilled together: a prefill run reads every expert's weights whatever
# its row count (measured on the int4 bench shape, 2 cores: one 64-token prompt 571 ms, sixteen together 2.3 s), so
# after a request is admitted the scheduler keeps admitting while arrivals follow within JOIN_GAP seconds, for at
# most JOIN_WINDOW seconds. Clients whose requests finished at one step come back within milliseconds of each other.
# A request reaching an idle scheduler right after one served alone does not wait: it is most likely that client's
# next request, with nobody behind it (one client: 10 ms more to every time to first token, for nothing). A burst
# arriving then has its first request prefilled alone; the others, queued meanwhile, join at the next step.
JOIN_GAP = 0.01
JOIN_WINDOW = 0.05


class QueueFullError(MoerunError):
    """The scheduler's queue is full: the server answers 503 with Retry-After at once."""


class SchedulerStoppedError(MoerunError):
    """The scheduler is shutting down, or its thread has stopped: the server answers 503."""


@dataclass(eq=False)
class Request:
    """One generation. ``emit(kind, value)`` is called on the scheduler thread: ("token", id) per new token,
    then once ("finish", reason) with reason "stop" (an EOS token, or the grammar complete), "length"
    (max_tokens), "cancelled", "timeout", "shutdown", or ("error", message).

    ``picker``: a TokenPicker (penalties, logit_bias, a grammar, logprobs: its ``picks``) that picks this request's
    tokens; None: ``sampling`` alone. ``copies``: requests with the same prompt (n choices) that take this one's
    prefill, its KV cache copied into their slots."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingConfig
    emit: Callable[[str, object], None]
    timeout: float | None = None
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    picker: TokenPicker | None = None
    copies: list[Request] = field(default_factory=list)

    def cancel(self) -> None:
        """Leave at the next step boundary (a stop string, a disconnected client); its slot is freed then."""
        self.cancelled = True

    @property
    def expired(self) -> bool:
        return self.timeout is not None and time.monotonic() - self.arrived > self.timeout


@dataclass(eq=False)
class _Running:
    request: Request
    rng: np.random.Generator
    last: int = -1
    count: int = 0


class Scheduler:
    """Owns a DecoderModel's session on one thread. ``submit`` never blocks: past ``max_queue`` waiting requests
    it raises QueueFullError. Each step admits waiting requests into free slots (lowest first, so the batch stays
    compact), prefills those in consecutive slots together, then runs one decode step over every busy slot."""

    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, max_len: int | None = None,
                 metrics: ServeMetrics | None = None) -> None:
        manifest = model.manifest
        self.model = model
        if max_len and manifest.max_positions and max_len > manifest.max_positions:
            raise MoerunError(f"--max-len {max_len} is more than this model's {manifest.max_positions} positions")
        self.max_len = max_len or min(manifest.max_positions or DEFAULT_MAX_LEN, DEFAULT_MAX_LEN)
        self.engine = make_engine(model.runner, max_batch, self.max_len, model.pad_token_id)
        self.max_batch = self.engine.max_batch
        self.eos = set(manifest.eos_token_id)
        self.metrics = metrics or ServeMetrics()
        self._queue: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self._running: dict[int, _Running] = {}
        self._held: Request | None = None  # taken from the queue, waiting for the next group (GroupEngine)
        self._peak = 0  # most requests holding slots at once since the scheduler was last idle
        self._solo = False  # the last busy spell served one request alone (a new scheduler may get a burst)
        self._closed = threading.Event()
        self.failure: str | None = None  # why the scheduler thread stopped, when it did on its own
        self._thread = threading.Thread(target=self._loop, name="moerun-scheduler", daemon=True)
        self._thread.start()

    @property
    def batching(self) -> str:
        return self.engine.batching

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    @property
    def busy(self) -> int:
        return len(self._running)

    @property
    def alive(self) -> bool:
        """The scheduler thread runs and takes requests."""
        return self._thread.is_alive() and not self._closed.is_set()

    def submit(self, request: Request) -> None:
        if self._closed.is_set():
            raise SchedulerStoppedError("the server is shutting down")
        if not self._thread.is_alive():
            raise SchedulerStoppedError(f"the scheduler has stopped ({self.failure}); restart the server")
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise QueueFullError(f"{self._queue.maxsize} requests are already waiting; retry shortly") from None
        self.metrics.queue_depth.set(self._queue.qsize())

    def close(self, timeout: float = 5.0) -> None:
        self._closed.set()
        self._thread.join(timeout)

    # --- the scheduler thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        """Admit and step until closed. A failure outside the model's runs (which fail only their requests) fails the
        running requests and the loop goes on; if the thread dies all the same, every request it holds is told."""
        reason = "shutdown"
        try:
            while not self._closed.is_set():
                try:
                    self._admit()
                    if self._running:
                        self._step()
                except Exception as e:
                    log.exception("scheduler step failed")
                    for slot in list(self._running):
                        self._finish(slot, "error", f"internal error: {_first_line(e)}")
        except BaseException as e:
            self.failure = reason = f"the scheduler thread stopped: {_first_line(e)}"
            raise
        finally:
            waiting = [entry.request for entry in self._running.values()]
            waiting += [self._held] if self._held is not None else []
            while not self._queue.empty():
                waiting.append(self._queue.get_nowait())
            for request in waiting:
                for each in [request, *request.copies]:
                    _tell(each, "finish", "shutdown") if reason == "shutdown" else _tell(each, "error", reason)

    def _admit(self) -> None:
        """Prefill waiting requests into free slots; waits (briefly, to notice close) only when nothing runs, and
        for JOIN_GAP after each admitted request unless the scheduler was idle after serving one request alone. An
        engine that cannot take requests into a running batch (``joins_running`` False) is given a new group only
        when idle, at most PREFILL_TOKENS padded tokens (a request that would pass it waits for the next group)."""
        if self._running and not self.engine.joins_running:
            return
        joining: list[int] = []
        copying: list[tuple[int, int]] = []  # (prefilled slot, slot taking a copy of its KV cache)
        window_ends = None
        wait_for_more = self.max_batch > 1 and (bool(self._running) or not self._solo)
        while len(self._running) < self.max_batch:
            try:
                if self._held is not None:
                    request, self._held = self._held, None
                elif joining and wait_for_more:  # others may be right behind: wait a moment for them
                    request = self._queue.get(timeout=max(0.0, min(JOIN_GAP, window_ends - time.monotonic())))
                elif not self._running and not joining:  # idle: wait, briefly, to notice close
                    request = self._queue.get(timeout=0.1)
                else:
                    request = self._queue.get_nowait()
            except queue.Empty:
                break
            window_ends = window_ends or time.monotonic() + JOIN_WINDOW
            self.metrics.queue_depth.set(self._queue.qsize())
            if request.cancelled or request.expired:
                _tell(request, "finish", "timeout" if request.expired else "cancelled")
                continue
            together = [*self._prompts(joining), *[request.prompt] * (1 + len(request.copies))]
            if joining and not self.engine.joins_running and not _one_prefill(together):
                self._held = request
                break
            if len(self._running) + 1 + len(request.copies) > self.max_batch:
                self._held = request  # its choices need more slots than are free: it goes first when they are
                break
            slot = self._open_slot(request)
            joining.append(slot)
            for copy in request.copies:
                if hasattr(self.engine, "copy_slot"):  # the prompt's KV cache is copied after the prefill
                    copying.append((slot, self._open_slot(copy)))
                else:  # prefilled in the same run, a row each
                    joining.append(self._open_slot(copy))
        self.metrics.running.set(len(self._running))
        self._peak = max(self._peak, len(self._running))
        for group in self._prefill_groups(sorted(joining)):
            requests = [self._running[slot].request for slot in group]
            self.metrics.prefill_size.observe(len(group))
            try:
                logits = self.engine.prefill(group[0], [r.prompt for r in requests], [r.max_tokens for r in requests])
            except Exception as e:  # ONNX Runtime failed on these requests: they fail, the others go on
                log.exception("prefill failed")
                for slot in group:
                    self._finish(slot, "error", _reason(e))
                continue
            for slot, row in zip(group, logits):
                copies = [target for source, target in copying if source == slot]
                for target in copies:
                    self.engine.copy_slot(slot, target)
                for each in [slot, *copies]:
                    self._take(each, row)

    def _open_slot(self, request: Request) -> int:
        slot = min(set(range(self.max_batch)) - set(self._running))
        self._running[slot] = _Running(request, np.random.default_rng(request.sampling.seed))
        return slot

    def _prefill_groups(self, slots: list[int]) -> list[list[int]]:
        """Runs of consecutive slots, each one prefill: at most PREFILL_TOKENS padded tokens (its logits are
        (rows, longest, vocab))."""
        groups: list[list[int]] = []
        for slot in slots:
            group = groups[-1] if groups else None
            if group and slot == group[-1] + 1 and _one_prefill(self._prompts([*group, slot])):
                group.append(slot)
            else:
                groups.append([slot])
        return groups

    def _prompts(self, slots: list[int]) -> list[list[int]]:
        return [self._running[slot].request.prompt for slot in slots]

    def _step(self) -> None:
        for slot, entry in list(self._running.items()):
            if entry.request.cancelled or entry.request.expired:
                self._finish(slot, "timeout" if entry.request.expired else "cancelled")
        if not self._running:
            return
        self.metrics.batch_size.observe(len(self._running))
        try:
            logits = self.engine.decode({slot: entry.last for slot, entry in self._running.items()})
        except Exception as e:
            log.exception("decode step failed")
            for slot in list(self._running):
                self._finish(slot, "error", _reason(e))
            return
        for slot in list(self._running):
            self._take(slot, logits[slot])

    def _take(self, slot: int, logits: np.ndarray) -> None:
        """Pick the slot's next token from its logits (vocab,), as DecoderRunner.generate does for one prompt."""
        entry = self._running[slot]
        request = entry.request
        if request.picker is None:
            token = int(pick_next(logits[None].astype(np.float32), request.sampling, entry.rng)[0])
        else:
            try:
                token = request.picker.pick(logits).token
            except MoerunError as e:  # its grammar failed: this request fails, the others go on
                self._finish(slot, "error", str(e))
                return
        entry.last, entry.count = token, entry.count + 1
        if entry.count == 1:
            self.metrics.ttft.observe(time.monotonic() - request.arrived)
        self.metrics.tokens.inc()
        _tell(request, "token", token)
        if token in self.eos or (request.picker is not None and request.picker.done):
            self._finish(slot, "stop")
        elif entry.count >= request.max_tokens:
            self._finish(slot, "length")

    def _finish(self, slot: int, reason: str, message: str | None = None) -> None:
        entry = self._running.pop(slot)
        self.engine.release(slot)
        self.metrics.running.set(len(self._running))
        if not self._running:  # idle again: remember whether this spell was one request alone
            self._solo, self._peak = self._peak == 1, 0
        self.metrics.latency.observe(time.monotonic() - entry.request.arrived)
        if reason == "error":
            _tell(entry.request, "error", message)
        else:
            _tell(entry.request, "finish", reason)


def _one_prefill(prompts: list[list[int]]) -> bool:
    """Whether these prompts, right-padded to the longest, fit one prefill run (PREFILL_TOKENS)."""
    return max(map(len, prompts)) * len(prompts) <= PREFILL_TOKENS


def _tell(request: Request, kind: str, value) -> None:
    """request.emit, never raising on the scheduler thread: a receiver that is gone (its event loop closed)
    cancels its request instead."""
    try:
        request.emit(kind, value)
    except Exception:
        log.warning("request receiver gone; cancelling it", exc_info=True)
        request.cancel()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _reason(e: Exception) -> str:
    return f"ONNX Runtime failed: {_first_line(e)}"
