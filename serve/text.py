"""A choice's token ids to the text sent to the client, as they arrive."""

from __future__ import annotations

__all__ = ["IncrementalText"]


class IncrementalText:
    """Token ids to text with the tokenizer's incremental decoder (no re-decode of the sequence per token), and
    stop strings: text that could begin one stays pending until it is known not to, so the pending text is at most
    the longest stop string (minus one) plus the newest piece, and each token costs work bounded by the stop
    strings' length, not by the text so far.

    ``capture_after``: a marker (a tool call's start) from which on text is captured, not sent: ``captured``.
    """

    def __init__(self, tokenizer, stops: list[str], skip_special_tokens: bool = True,
                 capture_after: str | None = None, skip_ids: frozenset[int] = frozenset()) -> None:
        self.stream = tokenizer.text_stream(skip_special_tokens) if tokenizer is not None else None
        self.stops = stops
        self.marker = capture_after
        self.skip_ids = skip_ids  # never text (EOS when special tokens are kept)
        self.ids: list[int] = []
        self.sent: list[str] = []
        self.pending = ""
        self.captured: str | None = None  # from the marker on, once seen
        self.stopped = False

    @property
    def text(self) -> str:
        """What was sent so far (all of it once ``flush``ed or stopped)."""
        return "".join(self.sent)

    def add(self, token: int) -> str:
        """The text that can be sent now."""
        self.ids.append(token)
        if self.stream is None or self.stopped or token in self.skip_ids:
            return ""
        piece = self.stream.step(token)
        if self.captured is not None:
            self.captured += piece
            return ""
        self.pending += piece
        return self._release(final=False)

    def flush(self) -> str:
        """The rest, at the end of generation."""
        if self.stream is None or self.stopped:
            return ""
        tail = self.stream.flush()
        if self.captured is not None:
            self.captured += tail
            return ""
        self.pending += tail
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.marker is not None and self.marker in self.pending:
            at = self.pending.index(self.marker)
            self.captured = self.pending[at:]
            self.pending = self.pending[:at]
            final = True
        hits = [at for at in (self.pending.find(stop) for stop in self.stops) if at >= 0]
        if hits:
            self.pending = self.pending[: min(hits)]
            self.stopped = final = True
        keep = 0 if final else self._could_begin()
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        self.sent.append(out)
        return out

    def _could_begin(self) -> int:
        """The length of the longest end of the pending text that begins a stop string or the marker."""
        longest = 0
        for word in [*self.stops, *([self.marker] if self.marker else [])]:
            for n in range(min(len(word) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(word[:n]):
                    longest = n
                    break
        return longest
