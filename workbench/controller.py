"""The elastic controller: trade quality for latency under load, visibly and reversibly.

Every `period_s` it samples load in [0, 1+]: GPU utilisation through NVML where there is one, otherwise
the scheduler's busy fraction over the period, and in any case the queue's pressure (waiting requests
per cache slot) and, with an SLO, the recent time to first token against it; the largest of these is the
load. A forecast (Holt's linear trend, or an EWMA) looks `horizon_s` ahead so the controller acts before
the queue builds. Above `high` it steps one rung up the ladder of policies (more sparsity), below `low`
one rung down; between the two it stays (hysteresis), and it never moves twice within `dwell_s`. At low
load it also widens the dynamic batcher's window (more requests merged per forward).

A rung only pays if it decodes faster than the one below it, and whether it does depends on the kernels,
the device and the batch size (on a GPU at batch 32, or on a CPU, our top-k sparsity is slower than
dense). So with `min_speedup` set, the controller judges each rung against the one below: from the
scheduler's profiling run (`warm=True` times every rung with all slots busy before serving), else from
the decode-step times measured while serving, at a batch size both were seen at. A rung not at least
`min_speedup` faster is never climbed to (or is stepped back from): no quality is given up for nothing.

Every move is a `Scheduler.set_policy` between two decode steps: nothing in flight is dropped, and each
request records the policies it was served under.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from workbench.errors import InputError
from workbench.policy import Policy


@dataclass(frozen=True)
class ControllerConfig:
    ladder: tuple[str, ...] = ("topk30", "topk50")  # policy names (as `workbench bench` spells them), calm -> loaded
    period_s: float = 5.0
    high: float = 0.85
    low: float = 0.40
    dwell_s: float = 10.0
    forecast: str | None = "holt"  # "holt", "ewma" or None (act on the latest sample)
    horizon_s: float = 10.0
    alpha: float = 0.5  # smoothing of the level
    beta: float = 0.3  # smoothing of the trend (holt)
    slo_ttft_s: float | None = None
    window_ms: tuple[float, float] = (2.0, 20.0)  # the batcher's window: at normal load, at low load
    min_speedup: float | None = 0.05  # a rung must decode this much faster than the one below (None: no check)
    timed_steps: int = 5  # decode steps at one batch size before a rung's speed is judged

    def __post_init__(self):
        if not self.ladder:
            raise InputError("the controller's ladder needs at least one policy")
        if not 0 <= self.low < self.high:
            raise InputError(f"controller thresholds need 0 <= low < high, got low={self.low}, high={self.high}")
        if self.period_s <= 0 or self.dwell_s < 0 or self.horizon_s < 0:
            raise InputError("period_s must be positive; dwell_s and horizon_s non-negative")
        if self.min_speedup is not None and not 0 <= self.min_speedup < 1:
            raise InputError(f"min_speedup must be in [0, 1) or None, got {self.min_speedup}")
        if self.forecast not in (None, "holt", "ewma"):
            raise InputError(f"forecast must be 'holt', 'ewma' or None, got {self.forecast!r}")


class Forecaster:
    """Holt's linear trend (level + trend) or an EWMA of the load samples, `steps` ahead."""

    def __init__(self, kind: str | None, alpha: float, beta: float):
        self.kind, self.alpha, self.beta = kind, alpha, beta
        self.level: float | None = None
        self.trend = 0.0

    def update(self, y: float) -> None:
        if self.level is None or self.kind is None:
            self.level = y
            return
        previous = self.level
        if self.kind == "ewma":
            self.level = self.alpha * y + (1 - self.alpha) * previous
        else:
            self.level = self.alpha * y + (1 - self.alpha) * (previous + self.trend)
            self.trend = self.beta * (self.level - previous) + (1 - self.beta) * self.trend

    def predict(self, steps: float) -> float:
        if self.level is None:
            return 0.0
        return max(0.0, self.level + (self.trend * steps if self.kind == "holt" else 0.0))


class ElasticController:
    """Moves the scheduler's policy along `config.ladder` as load rises and falls."""

    def __init__(self, scheduler, config: ControllerConfig = ControllerConfig(), batcher=None, start: bool = False,
                 warm: bool = False):
        self.scheduler, self.config, self.batcher = scheduler, config, batcher
        self.policies = [Policy.parse(name) for name in config.ladder]  # bad names fail here, early
        self.level = 0
        self.forecaster = Forecaster(config.forecast, config.alpha, config.beta)
        self.decisions: list[dict] = []
        self.unprofitable: set[int] = set()  # rungs measured no faster than the one below: never tried again
        self.samples: list[dict] = []
        self._moved_at = -float("inf")
        self._busy_at, self._busy_s = time.perf_counter(), scheduler.busy_s
        self._stop = threading.Event()
        self._thread = None
        self.why_not: dict[str, str] = {}  # rung name -> why it does not pay
        for policy in (self.policies[::-1] if warm else []):  # pack every rung's weights once, up front:
            scheduler.set_policy(policy, timeout=None)          # later switches reuse them (engine.store_cache)
        scheduler.set_policy(self.policies[0], timeout=None)
        if warm and config.min_speedup is not None and len(self.policies) > 1:
            scheduler.profile(self.policies)
        if start:
            self.start()

    @property
    def policy_name(self) -> str:
        return self.config.ladder[self.level]

    # ---- load ----------------------------------------------------------------------------------------------
    def sample_load(self) -> dict:
        """The load components now; `load` is the largest."""
        now = time.perf_counter()
        busy = (self.scheduler.busy_s - self._busy_s) / max(1e-9, now - self._busy_at)
        self._busy_at, self._busy_s = now, self.scheduler.busy_s
        parts = {"busy": min(1.0, busy)}
        gpu = _gpu_utilisation()
        if gpu is not None:
            parts["gpu"] = gpu
        state = self.scheduler.load
        parts["queue"] = state["waiting"] / max(1, state["slots"])
        if self.config.slo_ttft_s:
            recent = self._recent_ttft()
            if recent is not None:
                parts["latency"] = recent / self.config.slo_ttft_s
        return {"load": max(parts.values()), **parts}

    def _recent_ttft(self) -> float | None:
        metrics = self.scheduler.metrics
        if metrics is None:
            return None
        hist = metrics.ttft.collect()[0].samples
        total = next((s.value for s in hist if s.name.endswith("_sum")), 0.0)
        count = next((s.value for s in hist if s.name.endswith("_count")), 0.0)
        previous = getattr(self, "_ttft_seen", (0.0, 0.0))
        self._ttft_seen = (total, count)
        if count <= previous[1]:
            return None
        return (total - previous[0]) / (count - previous[1])  # mean TTFT of the requests since the last sample

    # ---- decisions -----------------------------------------------------------------------------------------
    def tick(self, load: float | None = None, now: float | None = None) -> dict | None:
        """One control period: sample (or take) the load, forecast, maybe move one rung. Returns the move."""
        now = time.perf_counter() if now is None else now
        sample = self.sample_load() if load is None else {"load": load}
        self.forecaster.update(sample["load"])
        expected = self.forecaster.predict(self.config.horizon_s / self.config.period_s)
        self.samples.append({"t": now, **sample, "forecast": expected, "level": self.level})
        if self.batcher is not None:  # low load: wait longer, merge more requests per forward
            calm, wide = self.config.window_ms
            self.batcher.timeout_ms = wide if expected < self.config.low else calm
        if now - self._moved_at < self.config.dwell_s:
            return None
        target, reason = self.level, None
        slower = self._does_not_pay(self.level)
        if slower is not None:
            target, reason = self.level - 1, slower
        elif (expected >= self.config.high and self.level < len(self.policies) - 1
              and self._does_not_pay(self.level + 1) is None):
            target = self.level + 1
        elif expected <= self.config.low and self.level > 0:
            target = self.level - 1
        if target == self.level:
            return None
        move = {"t": now, "from": self.policy_name, "to": self.config.ladder[target], "load": sample["load"],
                "forecast": expected, "direction": "up" if target > self.level else "down"}
        if reason:
            move["reason"] = reason
        self.level, self._moved_at = target, now
        self.scheduler.set_policy(self.policies[target], wait=False)
        self.decisions.append(move)
        if self.scheduler.metrics:
            self.scheduler.metrics.decision(move["direction"])
        return move

    def _does_not_pay(self, level: int) -> str | None:
        """Why rung `level` is no faster than the rung below (a sentence, remembered), or None when it is
        faster or not yet timed. Profiled times first (both rungs timed alike), else serving times at the
        largest batch size both were seen at over `timed_steps` steps."""
        if self.config.min_speedup is None or level == 0:
            return None
        if level in self.unprofitable:
            return self.why_not[self.config.ladder[level]]
        here, below = self.policies[level].name, self.policies[level - 1].name
        profiled = self.scheduler.profiled_ms
        pairs = [(b, ms, profiled[(below, b)]) for (name, b), ms in profiled.items()
                 if name == here and (below, b) in profiled]
        if not pairs:
            live, enough = self.scheduler.step_ms, self.config.timed_steps
            pairs = [(b, ms, live[(below, b)][0]) for (name, b), (ms, n) in live.items()
                     if name == here and n >= enough and live.get((below, b), (0.0, 0))[1] >= enough]
        if not pairs:
            return None
        b, ms, ms_below = max(pairs)
        if ms <= (1 - self.config.min_speedup) * ms_below:
            return None
        self.unprofitable.add(level)
        why = f"{here} decodes no faster than {below} at batch {b}: {ms:.1f} vs {ms_below:.1f} ms per step"
        self.why_not[self.config.ladder[level]] = why
        return why

    def start(self) -> None:
        def run():
            while not self._stop.wait(self.config.period_s):
                self.tick()
        self._thread = threading.Thread(target=run, name="workbench-controller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _gpu_utilisation() -> float | None:
    """GPU utilisation in [0, 1] through NVML, or None where there is no GPU or no NVML."""
    try:
        if not torch.cuda.is_available():
            return None
        return torch.cuda.utilization() / 100.0
    except Exception:  # no pynvml, or NVML refused: fall back to the busy fraction
        return None
