"""Dynamic batching for one-shot forward requests (scoring a text), as NVIDIA Triton's dynamic batcher:
requests arriving within `timeout_ms` of the first, up to `max_batch_size`, run as one padded forward.

    batcher = DynamicBatcher(engine, max_batch_size=8, timeout_ms=2)
    batcher.score("some text").result()   # {"tokens": [...], "logprobs": [...], "total_logprob": ...}
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

import torch

from workbench.errors import InputError
from workbench.scheduler import QueueFull
from workbench.tokens import encode_text


class DynamicBatcher:
    def __init__(self, engine, max_batch_size: int = 8, timeout_ms: float = 2.0, max_queue: int = 256,
                 max_tokens: int = 1024):
        if max_batch_size < 1 or timeout_ms < 0:
            raise InputError("max_batch_size must be positive and timeout_ms non-negative")
        self.engine, self.max_batch_size, self.timeout_ms = engine, max_batch_size, timeout_ms
        self.max_queue, self.max_tokens = max_queue, max_tokens
        self.batches: list[int] = []  # the size of every batch run (what the window achieved)
        self._queue: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="workbench-batcher", daemon=True)
        self._thread.start()

    def score(self, text: str) -> Future:
        """A future of the per-token log-probabilities of `text` (each token given the ones before it)."""
        if not isinstance(text, str) or not text:
            raise InputError("the text to score must be a non-empty string")
        ids = encode_text(self.engine.tokenizer, text)  # BOS first where the model uses one (not scored)
        if len(ids) < 2:
            raise InputError("the text to score needs at least two tokens")
        if len(ids) > self.max_tokens:
            raise InputError(f"the text has {len(ids)} tokens; at most {self.max_tokens} can be scored")
        if self._queue.qsize() >= self.max_queue:
            raise QueueFull(f"the scoring queue is full ({self.max_queue} waiting); retry later")
        future: Future = Future()
        self._queue.put((ids, future))
        return future

    def close(self) -> None:
        self._closed.set()
        self._queue.put(None)
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._closed.is_set():
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            deadline = time.perf_counter() + self.timeout_ms / 1e3
            while len(batch) < self.max_batch_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if item is None:
                    self._closed.set()
                    break
                batch.append(item)
            self._run(batch)
        while not self._queue.empty():  # nothing is left hanging
            item = self._queue.get()
            if item is not None:
                item[1].set_exception(InputError("the batcher was shut down"))

    def _run(self, batch) -> None:
        self.batches.append(len(batch))
        try:
            width = max(len(ids) for ids, _ in batch)
            pad = self.engine.tokenizer.pad_token_id or 0
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (tokens, _) in enumerate(batch):
                ids[row, :len(tokens)], mask[row, :len(tokens)] = torch.tensor(tokens), 1
            logprobs = torch.log_softmax(self.engine.forward(ids, mask), -1)
        except Exception as e:  # every waiting caller learns of it
            for _, future in batch:
                future.set_exception(e)
            return
        for row, (tokens, future) in enumerate(batch):
            n = len(tokens)
            lp = logprobs[row, :n - 1].gather(-1, torch.tensor(tokens[1:])[:, None].to(logprobs.device))[:, 0]
            future.set_result({"tokens": [self.engine.tokenizer.decode([t]) for t in tokens],
                               "logprobs": [None] + lp.tolist(), "total_logprob": float(lp.sum()),
                               "batch_size": len(batch)})
