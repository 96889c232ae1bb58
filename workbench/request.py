"""A request to the scheduler: its sequence, the text pieces for its consumer, its timings and the
policies it was served under; and `QueueFull`, the refusal when the waiting queue is at its bound.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

from workbench.errors import WorkbenchError
from workbench.runtime.sampling import SamplingParams, Sequence

log = logging.getLogger(__name__)


class QueueFull(WorkbenchError):
    """The waiting queue is at its bound: try again later (HTTP 429)."""


@dataclass
class Timings:
    arrival: float
    admitted: float | None = None  # prefill started
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def queue_s(self) -> float | None:
        return None if self.admitted is None else self.admitted - self.arrival

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e_s(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival

    @property
    def itl_s(self) -> list[float]:
        """Gaps between consecutive tokens (inter-token latency)."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


class Request:
    """One generation request: its sequence, a queue of text pieces for the consumer, its timings and the
    policies it was served under. `cancel()` frees its slot before the next step."""

    _ids = itertools.count(1)

    def __init__(self, prompt_ids: list[int], params: SamplingParams, listener=None):
        self.id = f"req-{next(self._ids)}"
        self.listener = listener  # called from the scheduler thread with each piece, then None (the server's bridge)
        self.seq = Sequence(list(prompt_ids), params)
        self.timings = Timings(time.perf_counter())
        self.policies: list[str] = []
        self.error: str | None = None
        self.text = ""  # the completion so far (what was put in `pieces`)
        self._pieces: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self.cancelled = threading.Event()

    @property
    def finish_reason(self) -> str | None:
        if self.cancelled.is_set() and self.seq.finish_reason is None:
            return "cancelled"
        return self.seq.finish_reason

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        self.cancelled.set()

    def pieces(self, timeout: float | None = None) -> Iterator[str]:
        """The completion's text piece by piece, until it finishes (blocking)."""
        while True:
            piece = self._pieces.get(timeout=timeout)
            if piece is None:
                if self.error:
                    raise WorkbenchError(self.error)
                return
            yield piece

    def result(self, timeout: float | None = None) -> dict:
        """Block until finished; the completion and what it went through."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self.id} did not finish within {timeout} s")
        if self.error:
            raise WorkbenchError(self.error)
        t = self.timings
        return {"id": self.id, "text": self.text, "finish_reason": self.finish_reason,
                "prompt_tokens": len(self.seq.prompt_ids), "completion_tokens": len(self.seq.tokens),
                "policies": list(self.policies), "queue_s": t.queue_s, "ttft_s": t.ttft_s, "e2e_s": t.e2e_s}

    # -- called by the scheduler thread ---------------------------------------------------------------------
    def _emit(self, text: str) -> None:
        if len(text) > len(self.text) and text.startswith(self.text):
            piece, self.text = text[len(self.text):], text
            self._pieces.put(piece)
            if self.listener is not None:
                self.listener(piece)

    def _finish(self, error: str | None = None) -> None:
        self.error = error
        self.timings.finished = time.perf_counter()
        self._pieces.put(None)
        self._done.set()
        if self.listener is not None:
            try:  # a listener that raises (the server's event loop gone) must not take the loop down with it
                self.listener(None)
            except Exception:
                log.exception("the listener of %s failed as it finished", self.id)
