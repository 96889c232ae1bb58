"""Prometheus metrics of the scheduled engine, named in vLLM's style with a `workbench:` prefix.

Each `Metrics` has its own registry (several schedulers in one process, as in tests, never collide);
the server exposes it on /metrics. The names, and what they measure:

    workbench:num_requests_running          gauge      requests holding a cache slot
    workbench:num_requests_waiting          gauge      requests in the queue
    workbench:request_rejected_total        counter    refused because the queue was full (HTTP 429)
    workbench:request_success_total         counter    finished, by finished_reason (eos, stop, length, cancelled)
    workbench:prompt_tokens_total           counter    prompt tokens prefilled
    workbench:generation_tokens_total       counter    tokens generated
    workbench:time_to_first_token_seconds   histogram  arrival to first token
    workbench:inter_token_latency_seconds   histogram  gap between consecutive tokens of a request
    workbench:e2e_request_latency_seconds   histogram  arrival to last token
    workbench:request_queue_time_seconds    histogram  arrival to admission (prefill start)
    workbench:batch_size                    histogram  requests in each decode step
    workbench:generation_tokens_per_second  gauge      over the last 5 s
    workbench:sparsity_level                gauge      the policy's target activation sparsity
    workbench:achieved_sparsity             gauge      measured zero fraction of linear inputs (since the switch)
    workbench:estimated_kld                 gauge      held-out KLD of the current policy, when measured
    workbench:controller_decisions_total    counter    elastic controller moves, by direction (up, down)
"""
from __future__ import annotations

import collections
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import disable_created_metrics

# `*_created` timestamps double the exposition and no dashboard reads them (vLLM leaves them out too).
disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def policy_sparsity(policy) -> float:
    """The target activation sparsity of a policy's default setting (0 for dense)."""
    sp = policy.default.sparsity
    return 0.0 if sp.is_identity else float(sp.target)


class Metrics:
    PREFIX = "workbench:"

    def __init__(self):
        r = self.registry = CollectorRegistry()
        p = self.PREFIX
        self.running = Gauge(p + "num_requests_running", "Requests holding a cache slot", registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Requests in the queue", registry=r)
        self.rejected_total = Counter(p + "request_rejected", "Requests refused: the queue was full", registry=r)
        self.success = Counter(p + "request_success", "Finished requests", ["finished_reason"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Gap between consecutive tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Arrival to last token", buckets=LATENCY_BUCKETS,
                             registry=r)
        self.queue_time = Histogram(p + "request_queue_time_seconds", "Arrival to admission",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram(p + "batch_size", "Requests in each decode step", buckets=BATCH_BUCKETS, registry=r)
        self.tps = Gauge(p + "generation_tokens_per_second", "Generated tokens per second over the last 5 s",
                         registry=r)
        self.sparsity = Gauge(p + "sparsity_level", "Target activation sparsity of the current policy", registry=r)
        self.achieved = Gauge(p + "achieved_sparsity", "Measured zero fraction of linear inputs", registry=r)
        self.kld = Gauge(p + "estimated_kld", "Held-out KLD of the current policy (NaN: not measured)", registry=r)
        self.decisions = Counter(p + "controller_decisions", "Elastic controller moves", ["direction"], registry=r)
        self.kld.set(float("nan"))
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self.kld_by_policy: dict[str, float] = {}
        self._stats_at = 0.0

    # ---- events from the scheduler ---------------------------------------------------------------------------
    def rejected(self) -> None:
        self.rejected_total.inc()

    def admitted(self, request) -> None:
        self.prompt_tokens.inc(len(request.seq.prompt_ids))
        if request.timings.queue_s is not None:
            self.queue_time.observe(request.timings.queue_s)

    def stepped(self, batch: int) -> None:
        self.batch.observe(batch)

    def finished(self, request) -> None:
        t = request.timings
        n = len(request.seq.tokens)
        self.generation_tokens.inc(n)
        self.success.labels(request.finish_reason or "unknown").inc()
        if t.ttft_s is not None:
            self.ttft.observe(t.ttft_s)
        if t.e2e_s is not None:
            self.e2e.observe(t.e2e_s)
        for gap in t.itl_s:
            self.itl.observe(gap)
        self._recent.append((time.perf_counter(), n))

    def observe_scheduler(self, scheduler) -> None:
        load = scheduler.load
        self.running.set(load["running"])
        self.waiting.set(load["waiting"])
        now = time.perf_counter()
        while self._recent and self._recent[0][0] < now - 5.0:
            self._recent.popleft()
        self.tps.set(sum(n for _, n in self._recent) / 5.0)
        if now - self._stats_at > 1.0:  # stats() walks every module: once a second is enough
            self._stats_at = now
            stats = scheduler.engine.stats().get("achieved_sparsity") or {}
            if stats.get("overall") is not None:
                self.achieved.set(stats["overall"])

    def policy_changed(self, policy) -> None:
        self.sparsity.set(policy_sparsity(policy))
        self.kld.set(self.kld_by_policy.get(policy.name, float("nan")))

    def decision(self, direction: str) -> None:
        self.decisions.labels(direction).inc()

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
