"""Continuous batching: requests join free cache slots of the batch runner between decode steps.

    scheduler = Scheduler(engine, max_num_seqs=8, max_queue=64)
    request = scheduler.submit("Why is the sky blue?", SamplingParams(max_new_tokens=32))
    for piece in request.pieces():        # streamed text, as it is decoded
        ...
    request.result()                      # the whole completion, finish reason, timings, policy levels

The scheduler keeps the queue, the thread, the controller hook and the timings; the decoding itself is
the engine's batch runner (`workbench.runtime.runner`), the same loop `Engine.generate` drives. One thread
owns the engine and loops: apply a pending policy change, drop cancelled requests (their slots come free
at once), admit waiting requests into free slots, prefilled together in one pass (up to `prefill_budget`
padded prompt tokens per iteration, so a burst of prompts does not stall everyone's next token for long),
then one decode step for every running request. A request waits in a bounded queue: beyond `max_queue`
it is refused with `QueueFull` (the server's 429), never silently dropped. A policy change (the elastic
controller's) is an `engine.reconfigure` between two steps: the KV cache is kept, so running requests go
on under the new policy, and each records every policy it was served under.

One request's failure (at admission, in its prefill, in sampling) fails that request alone; a failed
decode step fails the requests it was stepping (the runner rebuilds); only a failure outside those
closes the scheduler, and then every request still waiting or running is answered with the error.
"""
from __future__ import annotations

import collections
import logging
import threading
import time

import torch

from workbench.errors import InputError, WorkbenchError
from workbench.policy import Policy
from workbench.request import QueueFull, Request
from workbench.runtime.cache import cache_capacity
from workbench.runtime.runner import padded_cost
from workbench.runtime.sampling import SamplingParams, Sequence

log = logging.getLogger(__name__)

__all__ = ["QueueFull", "Request", "Scheduler"]


class Scheduler:
    """Continuous batching over one engine (Llama-family, Gemma 3 and DeepSeek-V3 models: the engine's batch runner)."""

    def __init__(self, engine, max_num_seqs: int = 8, max_queue: int = 64, max_model_len: int = 1024,
                 prefill_budget: int = 2048, metrics=None, start: bool = True):
        if engine.decode_path != "workbench":
            raise InputError(f"continuous batching needs the engine's decode loop; {engine.name} runs transformers'")
        if max_num_seqs < 1 or max_queue < 0 or prefill_budget < 1:
            raise InputError("max_num_seqs and prefill_budget must be positive and max_queue non-negative")
        self.engine, self.metrics = engine, metrics
        self.max_num_seqs, self.max_queue, self.prefill_budget = max_num_seqs, max_queue, prefill_budget
        self.max_model_len = cache_capacity(max_model_len, engine.max_positions)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._cond = threading.Condition()
        self._pending_policy = None
        self._policy_applied = threading.Event()
        self._policy_error: Exception | None = None
        self._jobs: list = []  # callables the loop runs between two iterations (profiling)
        self._closed = False
        self.runner = None  # the batch runner, built by the loop on first use (its cache outlives policies)
        self.finisher = engine.finisher()
        self.busy_s = 0.0  # time spent stepping (the controller's busy fraction reads it)
        self.prefill_s = self.decode_s = 0.0  # of which prefilling prompts, and decode steps (both synced)
        self.steps = 0
        self.prefills = 0  # admission passes
        # Decode-step time per (policy name, batch size): a running mean over the last few steps, and how
        # many steps it saw. The controller reads it to tell whether a rung of its ladder is faster at all.
        self.step_ms: dict[tuple[str, int], tuple[float, int]] = {}
        self.profiled_ms: dict[tuple[str, int], float] = {}  # from `profile`: (policy name, batch) -> ms
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
        in a scratch runner between two iterations of the loop (running requests wait that long, no more),
        then the scheduler's policy is restored. Like a serving engine's profiling run: the controller
        reads it to know, before serving under a rung, whether that rung decodes faster at all."""
        batch = batch or self.max_num_seqs
        times = self._in_loop(lambda: self._profile(list(policies), batch, steps, prompt_tokens), timeout)
        self.profiled_ms.update({(name, batch): ms for name, ms in times.items()})
        return times

    def _profile(self, policies, batch: int, steps: int, prompt_tokens: int) -> dict[str, float]:
        original, times = self.engine.policy, {}
        capacity = cache_capacity(prompt_tokens + steps + 4)
        params = SamplingParams(max_new_tokens=steps + 2, ignore_eos=True)
        prompt = [1 + i % 1000 for i in range(prompt_tokens)]
        try:
            for policy in policies:
                self.engine.reconfigure(policy)
                runner = self.engine.runner(batch, capacity, cached=False)
                runner.admit([Sequence(list(prompt), params) for _ in range(batch)])
                samples = []
                for i in range(steps + 1):  # the first step is a warm-up
                    t0 = time.perf_counter()
                    runner.step()  # waits for the device, as a real step does
                    if i:
                        samples.append((time.perf_counter() - t0) * 1e3)
                times[self.engine.policy.name] = sorted(samples)[len(samples) // 2]
                del runner
        finally:
            self.engine.reconfigure(original)
        return times

    def warm_up(self, max_prompt_tokens: int, timeout: float | None = None, policies=()) -> int:
        """Capture the prefill graphs (GPU) of every bucket up to `max_prompt_tokens` and every batch the
        slots and the prefill budget allow, on free slots, so that no request pays for a capture later;
        returns how many buckets were captured (none on a CPU). Load tests call it before timing. With
        `policies` (an elastic ladder) the serving runner builds each one's decode and prefill graphs too,
        then the policy in force is restored: a later switch to one of them replays those graphs
        (`workbench.policy_builds`) instead of capturing while requests wait."""
        return self._in_loop(lambda: self._warm_all(max_prompt_tokens, list(policies)), timeout)

    def _warm_all(self, max_prompt_tokens: int, policies: list) -> int:
        original, captured = self.engine.policy, 0
        try:
            for policy in policies:
                self.engine.reconfigure(policy)
                captured += self._warm_up(max_prompt_tokens)
        finally:
            if policies:
                self.engine.reconfigure(original)
        return captured + self._warm_up(max_prompt_tokens)

    def _warm_up(self, max_prompt_tokens: int) -> int:
        runner = self._runner()
        prefill, cache = runner.prefill_graphs, runner.cache
        if prefill is None:
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
                    with self.engine.dense_prefill():
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
                with self.engine.exclusive(), torch.inference_mode():
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

    def _runner(self):
        """The batch runner, built on first use; a policy change keeps it (and its cache: the keys and
        values stay valid), and it rebuilds its decoder and graphs by itself."""
        if self.runner is None:
            self.runner = self.engine.runner(self.max_num_seqs, self.max_model_len, cached=False,
                                             graphed_prefill=True)
        return self.runner

    def _fail_all(self, message: str) -> None:
        with self._cond:
            self._closed = True
            pending = list(self.waiting) + list(self.running)
            self.waiting.clear()
            self.running = []
        for r in pending:
            if not r.done:
                r._finish(message)

    def _apply(self, policy) -> None:
        self._policy_error = None
        try:
            self.engine.reconfigure(policy)
        except Exception as e:  # a bad policy is the caller's error; serving goes on under the old one
            log.error("policy change to %s failed: %s", getattr(policy, "name", policy), e)
            self._policy_error = e
        finally:
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
            self.runner.cancel(r.seq)
            self._settle(r)

    def _admit(self) -> None:
        """Move waiting requests into free slots, as many as the prefill budget allows in padded tokens
        (decode steps go first; the rest join next iteration), and prefill them together."""
        runner = self._runner()
        admitted: list[Request] = []
        with self._cond:
            while self.waiting and len(admitted) < runner.free_slots:
                lengths = [len(r.seq.prompt_ids) for r in admitted + [self.waiting[0]]]
                if admitted and padded_cost(lengths) > self.prefill_budget:
                    break
                admitted.append(self.waiting.popleft())
        if not admitted:
            return
        t0 = time.perf_counter()
        for r in admitted:
            r.timings.admitted = t0
            self._note_policy(r)
        runner.admit([r.seq for r in admitted], budget=self.prefill_budget)
        self.prefills += 1
        for r in admitted:
            if r.seq.finish_reason != "error":
                self.running.append(r)
                if self.metrics:
                    self.metrics.admitted(r)
            self._took(r)
        self.prefill_s += time.perf_counter() - t0

    def _decode(self) -> None:
        t0 = time.perf_counter()
        batch = len(self.running)
        for r in self.running:
            self._note_policy(r)
        self.runner.step()
        self.steps += 1
        if self.metrics:
            self.metrics.stepped(batch)
        for r in list(self.running):
            self._took(r)
        key = (self.engine.policy.name, batch)
        mean, n = self.step_ms.get(key, (0.0, 0))
        ms = (time.perf_counter() - t0) * 1e3
        self.decode_s += ms / 1e3
        self.step_ms[key] = (ms if n == 0 else mean + (ms - mean) / min(n + 1, 8), n + 1)

    def _took(self, r: Request) -> None:
        """After the runner gave `r` a token (or failed it): stream its text, time it, settle it if done."""
        if r.seq.finish_reason != "error":
            now = time.perf_counter()
            if r.timings.first_token is None:
                r.timings.first_token = now
            r.timings.token_times.append(now)
            try:  # its consumer's side (a listener whose event loop is gone) fails this request alone
                r._emit(self.finisher.visible(r.seq))
            except Exception as e:
                r.seq.fail("streaming its text", e)
        if r.seq.finished:
            self._settle(r)

    def _settle(self, r: Request) -> None:
        """A finished request leaves: its slot is freed, its consumer told (with the error, if it failed)."""
        self.runner.retire()
        if r in self.running:
            self.running.remove(r)
        if r.seq.finish_reason == "error":
            log.error("request %s %s", r.id, r.seq.error,
                      exc_info=(type(r.seq.exception), r.seq.exception, r.seq.exception.__traceback__))
            self.failed_requests += 1
            r._finish(f"request {r.id} {r.seq.error}")
        else:
            r._finish()
        if self.metrics:
            self.metrics.finished(r)

    def _note_policy(self, r: Request) -> None:
        name = self.engine.policy.name
        if not r.policies or r.policies[-1] != name:
            r.policies.append(name)
