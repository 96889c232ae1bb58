"""Continuous batching on the engine's decode loop: requests join free cache slots between decode steps.

    scheduler = Scheduler(engine, max_num_seqs=8, max_queue=64)
    request = scheduler.submit("Why is the sky blue?", SamplingParams(max_new_tokens=32))
    for piece in request.pieces():        # streamed text, as it is decoded
        ...
    request.result()                      # the whole completion, finish reason, timings, policy levels

One thread owns the engine and loops: apply a pending policy change, drop cancelled requests (their slots
come free at once), admit waiting requests into free slots and prefill them together in one pass (up to
`prefill_budget` padded prompt tokens per iteration, so a burst of prompts does not stall everyone's next
token for long; one pass reads the weights once for all of them), then one decode step for every
running request. A request waits in a bounded queue: beyond `max_queue` it is
refused with `QueueFull` (the server's 429), never silently dropped. A policy change (the elastic
controller's) is an `engine.reconfigure` between two steps: the KV cache is kept, so running requests go
on under the new policy, and each records every policy it was served under.
"""
from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from workbench.decode import SamplingParams, Sequence, SlotKVCache, new_generator, padded_cost, sample
from workbench.errors import InputError, WorkbenchError
from workbench.policy import Policy

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


class Scheduler:
    """Continuous batching over one engine (Llama-family models: the engine's own decode loop)."""

    def __init__(self, engine, max_num_seqs: int = 8, max_queue: int = 64, max_model_len: int = 1024,
                 prefill_budget: int = 2048, metrics=None, start: bool = True):
        from workbench.engine import CACHE_QUANTUM
        if engine.decode_path != "workbench":
            raise InputError(f"continuous batching needs the engine's decode loop; {engine.name} runs transformers'")
        if max_num_seqs < 1 or max_queue < 0 or prefill_budget < 1:
            raise InputError("max_num_seqs and prefill_budget must be positive and max_queue non-negative")
        self.engine, self.metrics = engine, metrics
        self.max_num_seqs, self.max_queue, self.prefill_budget = max_num_seqs, max_queue, prefill_budget
        self.max_model_len = min(engine.max_positions, -(-max_model_len // CACHE_QUANTUM) * CACHE_QUANTUM)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._cond = threading.Condition()
        self._pending_policy = None
        self._policy_applied = threading.Event()
        self._policy_error: Exception | None = None
        self._jobs: list = []  # callables the loop runs between two iterations (profiling)
        self._closed = False
        self._cache: SlotKVCache | None = None
        self._decoder = self._step = self._prefill = None
        self.busy_s = 0.0  # time spent stepping (the controller's busy fraction reads it)
        self.prefill_s = self.decode_s = 0.0  # of which prefilling prompts, and decode steps (both synced)
        self.steps = 0
        self.prefills = 0  # batched prefill passes
        # Decode-step time per (policy name, batch size): a running mean over the last few steps, and how
        # many steps it saw. The controller reads it to tell whether a rung of its ladder is faster at all.
        self.step_ms: dict[tuple[str, int], tuple[float, int]] = {}
        self.profiled_ms: dict[tuple[str, int], float] = {}  # from `profile`: (policy name, batch) -> ms
        self.finisher = engine.finisher()
        self.failure: str | None = None  # why the loop itself died (then /health says unhealthy)
        self.failed_requests = 0  # requests that failed alone while the loop went on
        self._thread = threading.Thread(target=self._loop, name="workbench-scheduler", daemon=True)
        if start:
            self._thread.start()

    # ---- the public side ---------------------------------------------------------------------------------
    def submit(self, prompt, params: SamplingParams | None = None, chat: bool | None = None,
               listener=None) -> Request:
        """Queue a prompt (text, chat messages, or token ids); raises InputError for a bad request and
        QueueFull when the queue is at its bound. `listener(piece)` hears each text piece, then None."""
        params = params or SamplingParams()
        params.validate()
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = prompt
        else:
            ids = self.engine.token_ids([prompt], chat)[0]
        if not ids:
            raise InputError("prompt is empty after tokenization")
        if len(ids) + params.max_new_tokens > self.max_model_len:
            raise InputError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_new_tokens}) exceeds the "
                             f"server's context of {self.max_model_len} tokens")
        request = Request(ids, params, listener)
        with self._cond:
            if self._closed:
                raise WorkbenchError(self._stopped_message())
            if len(self.waiting) >= self.max_queue:
                if self.metrics:
                    self.metrics.rejected()
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self.waiting.append(request)
            self._cond.notify()
        return request

    def generate(self, prompt, params: SamplingParams | None = None, chat: bool | None = None,
                 timeout: float | None = None) -> dict:
        return self.submit(prompt, params, chat).result(timeout)

    def set_policy(self, policy, wait: bool = True, timeout: float | None = 60) -> None:
        """Switch the engine's policy between two decode steps (running requests go on under it). A bad
        policy raises here and serving goes on under the old one; a stopped scheduler raises at once."""
        if not isinstance(policy, Policy):  # None would read as "nothing pending": never applied, never answered
            raise InputError(f"set_policy takes a Policy, got {type(policy).__name__}")
        with self._cond:
            if self._closed:
                raise WorkbenchError(self._stopped_message())
            self._pending_policy = policy
            self._policy_applied.clear()
            self._cond.notify()
        if not wait:
            return
        deadline = None if timeout is None else time.perf_counter() + timeout
        while not self._policy_applied.wait(0.1):
            if self._closed:  # the loop died (or was closed) before it got there
                raise WorkbenchError(self._stopped_message())
            if deadline is not None and time.perf_counter() > deadline:
                raise TimeoutError("the policy change did not happen in time")
        if self._policy_error is not None:
            raise self._policy_error

    def _stopped_message(self) -> str:
        return f"the scheduler stopped: {self.failure}" if self.failure else "the scheduler is shut down"

    @property
    def alive(self) -> bool:
        """False once the loop itself has died (every request then fails at once; /health says so)."""
        return self.failure is None and (self._thread.is_alive() or not self._thread.ident)

    def profile(self, policies, batch: int | None = None, steps: int = 6, prompt_tokens: int = 32,
                timeout: float | None = None) -> dict[str, float]:
        """Median decode-step time (ms) at `batch` (default: every slot busy) under each policy, measured
        in a scratch cache between two iterations of the loop (running requests wait that long, no more),
        then the scheduler's policy is restored. Like a serving engine's profiling run: the controller
        reads it to know, before serving under a rung, whether that rung decodes faster at all."""
        batch = batch or self.max_num_seqs
        times = self._in_loop(lambda: self._profile(list(policies), batch, steps, prompt_tokens), timeout)
        self.profiled_ms.update({(name, batch): ms for name, ms in times.items()})
        return times

    def warm_up(self, max_prompt_tokens: int, timeout: float | None = None) -> int:
        """Capture the prefill graphs (GPU) of every bucket up to `max_prompt_tokens` and every batch the
        slots and the prefill budget allow, on free slots, so that no request pays for a capture later;
        returns how many buckets were captured (none on a CPU). Load tests call it before timing."""
        return self._in_loop(lambda: self._warm_up(max_prompt_tokens), timeout)

    def _warm_up(self, max_prompt_tokens: int) -> int:
        from workbench.decode import GraphedPrefill
        _, cache, _ = self._state()
        prefill = self._prefill
        if not isinstance(prefill, GraphedPrefill):
            return 0
        before = len(prefill.graphs)
        lengths = sorted({prefill.bucket(1, n)[1] for n in range(2, min(max_prompt_tokens, cache.capacity) + 1)})
        for t in lengths:
            for b in prefill.BATCHES:
                n = min(b, cache.free_slots)  # a bucket wider than the free slots is reached by n prompts
                if n < 1 or prefill.bucket(n, t)[0] != b or b * t > prefill.max_tokens:
                    break
                slots = [cache.acquire() for _ in range(n)]
                try:
                    with self.engine._dense_prefill():
                        prefill(cache, slots, [torch.ones(t, dtype=torch.long, device=cache.lengths.device)] * n)
                finally:
                    for slot in slots:
                        cache.release(slot)
                if b * t >= self.prefill_budget:  # the budget admits no wider batch of this length
                    break
        return len(prefill.graphs) - before

    def _in_loop(self, fn, timeout: float | None):
        """Run `fn` on the scheduler's thread between two iterations (it owns the engine); its result."""
        done, box = threading.Event(), {}

        def job():
            try:
                box["result"] = fn()
            except Exception as e:  # reported to the caller, never kills the loop
                box["error"] = e
            finally:
                done.set()
        with self._cond:
            if self._closed:
                raise WorkbenchError("the scheduler is shut down")
            self._jobs.append(job)
            self._cond.notify()
        deadline = None if timeout is None else time.perf_counter() + timeout
        while not done.wait(0.1):
            if self._closed:
                raise WorkbenchError("the scheduler shut down before the job ran")
            if deadline is not None and time.perf_counter() > deadline:
                raise TimeoutError("the scheduler's job did not finish in time")
        if "error" in box:
            raise box["error"]
        return box["result"]

    def _profile(self, policies, batch: int, steps: int, prompt_tokens: int) -> dict[str, float]:
        from workbench.decode import Decoder, GraphedStep
        from workbench.engine import CACHE_QUANTUM
        original, times = self.engine.policy, {}
        capacity = -(-(prompt_tokens + steps + 4) // CACHE_QUANTUM) * CACHE_QUANTUM
        try:
            for policy in policies:
                self.engine.reconfigure(policy)
                decoder = Decoder(self.engine.model)
                cache = SlotKVCache.for_model(self.engine.model, batch, capacity)
                device = cache.lengths.device
                prompt = torch.arange(1, prompt_tokens + 1, device=device) % 1000
                with self.engine._dense_prefill():
                    decoder.prefill_batch(cache, [cache.acquire() for _ in range(batch)], [prompt] * batch)
                step = decoder.step
                if self.engine.use_cuda_graphs and not decoder.sparse_attention:
                    step = GraphedStep(decoder, cache)
                ids, active = torch.ones(batch, dtype=torch.long, device=device), torch.ones(batch, dtype=torch.long,
                                                                                            device=device)
                samples = []
                for i in range(steps + 1):  # the first step is a warm-up
                    t0 = time.perf_counter()
                    logits = step(cache, ids)
                    cache.advance(active, list(range(batch)))
                    logits.argmax(-1).tolist()  # wait for the device, as a real step does
                    if i:
                        samples.append((time.perf_counter() - t0) * 1e3)
                times[self.engine.policy.name] = sorted(samples)[len(samples) // 2]
                del step, cache, decoder
        finally:
            self.engine.reconfigure(original)
            self._decoder = self._step = self._prefill = None
        return times

    @property
    def load(self) -> dict:
        with self._cond:
            return {"running": len(self.running), "waiting": len(self.waiting), "slots": self.max_num_seqs}

    def close(self, timeout: float = 10) -> None:
        """Stop the loop; requests still waiting or running finish with an error (nothing hangs)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # ---- the loop ----------------------------------------------------------------------------------------
    # One request's failure (at admission, in its prefill, in sampling) fails that request alone; a failed
    # decode step fails the requests it was stepping (it cannot tell whose fault it was) and the loop
    # rebuilds its decoder and cache; only a failure outside those closes the scheduler.
    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._closed or self.waiting or self.running or self._pending_policy is not None
                               or self._jobs):
                        self._cond.wait()
                    if self._closed:
                        break
                    policy, self._pending_policy = self._pending_policy, None
                    jobs, self._jobs = self._jobs, []
                with self.engine._lock, torch.inference_mode():
                    for job in jobs:  # profiling, warm-up: not serving, so not in busy_s
                        job()
                    t0 = time.perf_counter()
                    if policy is not None:
                        self._apply(policy)
                    self._drop_cancelled()
                    self._admit()
                    if self.running:
                        self._decode()
                self.busy_s += time.perf_counter() - t0
                if self.metrics:
                    self.metrics.observe_scheduler(self)
        except BaseException as e:  # a bug must not leave clients hanging: everyone gets the error
            log.exception("the scheduler loop stopped")
            self.failure = f"{type(e).__name__}: {e}"
            self._fail_all(f"the scheduler stopped: {self.failure}")
            return
        self._fail_all("the scheduler was shut down")

    def _fail_all(self, message: str) -> None:
        with self._cond:
            self._closed = True
            pending = list(self.waiting) + list(self.running)
            self.waiting.clear()
            self.running = []
        for r in pending:
            if not r.done:
                r._finish(message)

    def _fail(self, r: Request, where: str, error: BaseException) -> None:
        """Fail one request with a message naming its id (the traceback goes to the log)."""
        log.error("request %s failed %s: %s: %s", r.id, where, type(error).__name__, error,
                  exc_info=(type(error), error, error.__traceback__))
        self.failed_requests += 1
        if r.seq.slot is not None and self._cache is not None:
            self._cache.release(r.seq.slot)
            r.seq.slot = None
        if r in self.running:
            self.running.remove(r)
        if not r.done:
            r._finish(f"request {r.id} failed {where}: {type(error).__name__}: {error}")
        if self.metrics:
            self.metrics.finished(r)

    def _state(self):
        """Decoder, cache and step, built on first use and rebuilt after a policy change (the cache is
        kept: its keys and values stay valid)."""
        from workbench.decode import Decoder, GraphedPrefill, GraphedStep
        if self._decoder is None:
            self._decoder = Decoder(self.engine.model)
            if self._cache is None:
                self._cache = SlotKVCache.for_model(self.engine.model, self.max_num_seqs, self.max_model_len)
            self._step, self._prefill = self._decoder.step, self._decoder.prefill_batch
            if self.engine.use_cuda_graphs and not self._decoder.sparse_attention:
                self._step = GraphedStep(self._decoder, self._cache)
                self._prefill = GraphedPrefill(self._decoder, self._cache)
        return self._decoder, self._cache, self._step

    def _reset_state(self) -> None:
        """After a failed step: drop the decoder, graphs and cache (rebuilt on the next admission)."""
        self._decoder = self._step = self._prefill = self._cache = None

    def _apply(self, policy) -> None:
        self._policy_error = None
        try:
            self.engine.reconfigure(policy)
        except Exception as e:  # a bad policy is the caller's error; serving goes on under the old one
            log.error("policy change to %s failed: %s", getattr(policy, "name", policy), e)
            self._policy_error = e
        finally:
            self._decoder = self._step = self._prefill = None  # it may hold replaced modules
            self._policy_applied.set()
        if self.metrics and self._policy_error is None:
            self.metrics.policy_changed(self.engine.policy)

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [r for r in self.waiting if r.cancelled.is_set()]
            for r in gone:
                self.waiting.remove(r)
        for r in gone:
            r._finish()
        for r in [r for r in self.running if r.cancelled.is_set()]:
            self._retire(r)

    def _admit(self) -> None:
        """Move waiting requests into free slots and prefill them together in one pass, as many as the
        prefill budget allows in padded tokens (decode steps go first; the rest join next iteration)."""
        _, cache, _ = self._state()
        admitted: list[Request] = []
        with self._cond:
            while self.waiting and len(admitted) < cache.free_slots:
                lengths = [len(r.seq.prompt_ids) for r in admitted + [self.waiting[0]]]
                if admitted and padded_cost(lengths) > self.prefill_budget:
                    break
                admitted.append(self.waiting.popleft())
        if not admitted:
            return
        now = time.perf_counter()
        ready = []
        for r in admitted:
            r.timings.admitted = now
            try:
                r.seq.slot = cache.acquire()
                r.seq.generator = new_generator(r.seq.params)
            except Exception as e:
                self._fail(r, "at admission", e)
                continue
            self._note_policy(r)
            ready.append(r)
        t0 = time.perf_counter()
        self._prefill_group(ready)
        self.prefill_s += time.perf_counter() - t0

    def _prefill_group(self, group: list[Request]) -> None:
        """Prefill `group` in one pass; if that pass fails, each request alone, so only the culprit fails."""
        if not group:
            return
        device = self._cache.lengths.device
        try:
            prompts = [torch.tensor(r.seq.prompt_ids, dtype=torch.long, device=device) for r in group]
            with self.engine._dense_prefill():
                logits = self._prefill(self._cache, [r.seq.slot for r in group], prompts)
        except Exception as e:
            if len(group) == 1:
                self._fail(group[0], "in prefill", e)
                return
            for r in group:
                self._prefill_group([r])
            return
        self.prefills += 1
        for r, row in zip(group, logits):
            self.running.append(r)
            if self.metrics:
                self.metrics.admitted(r)
            self._sample_and_take(r, row)

    def _decode(self) -> None:
        t0 = time.perf_counter()
        batch = len(self.running)
        self._decode_step()
        key = (self.engine.policy.name, batch)
        mean, n = self.step_ms.get(key, (0.0, 0))
        ms = (time.perf_counter() - t0) * 1e3
        self.decode_s += ms / 1e3
        self.step_ms[key] = (ms if n == 0 else mean + (ms - mean) / min(n + 1, 8), n + 1)

    def _decode_step(self) -> None:
        _, cache, step = self._state()
        ids = torch.zeros(cache.slots, dtype=torch.long)
        active = torch.zeros(cache.slots, dtype=torch.long)
        for r in self.running:
            ids[r.seq.slot], active[r.seq.slot] = r.seq.tokens[-1], 1
            self._note_policy(r)
        device = cache.lengths.device
        try:
            logits = step(cache, ids.to(device))
            cache.advance(active.to(device), [r.seq.slot for r in self.running])
            chosen = logits.argmax(-1).tolist() if all(r.seq.params.greedy for r in self.running) else None
        except Exception as e:
            for r in list(self.running):
                self._fail(r, "in a decode step", e)
            self._reset_state()
            return
        self.steps += 1
        if self.metrics:
            self.metrics.stepped(len(self.running))
        for r in list(self.running):
            if chosen is not None:  # one small transfer instead of S x V logits
                self._take(r, chosen[r.seq.slot])
            else:
                self._sample_and_take(r, logits[r.seq.slot])

    def _sample_and_take(self, r: Request, logits: torch.Tensor) -> None:
        try:
            token = sample(logits, r.seq.params, r.seq.generator, r.seq.tokens)
        except Exception as e:
            self._fail(r, "in sampling", e)
            return
        self._take(r, token)

    def _take(self, r: Request, token: int) -> None:
        """Record one sampled token: the finisher decides whether it ends the sequence; stream the text."""
        now = time.perf_counter()
        if r.timings.first_token is None:
            r.timings.first_token = now
        r.timings.token_times.append(now)
        try:
            self.finisher.update(r.seq, token)
            r._emit(self.finisher.visible(r.seq))
        except Exception as e:
            self._fail(r, "decoding its text", e)
            return
        if r.seq.finished or len(r.seq.prompt_ids) + len(r.seq.tokens) >= self._cache.capacity:
            if r.seq.finish_reason is None:
                r.seq.finish_reason = "length"
            self._retire(r)

    def _retire(self, r: Request) -> None:
        if r.seq.slot is not None:
            self._cache.release(r.seq.slot)
            r.seq.slot = None
        if r in self.running:
            self.running.remove(r)
        r._finish()
        if self.metrics:
            self.metrics.finished(r)

    def _note_policy(self, r: Request) -> None:
        name = self.engine.policy.name
        if not r.policies or r.policies[-1] != name:
            r.policies.append(name)
