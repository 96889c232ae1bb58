"""SchedulerDashboard: run a load test on the engine and watch the queue, the batch, the policy and the
latency move, live."""
from __future__ import annotations

import html
import math
import threading
import time

import ipywidgets as W

from workbench.controller import ControllerConfig, ElasticController
from workbench.loadtest import make_workload, summarise
from workbench.metrics import Metrics, policy_sparsity
from workbench.runtime.cache import cache_capacity
from workbench.runtime.sampling import SamplingParams
from workbench.scheduler import QueueFull, Scheduler
from workbench.widgets.panel import Panel, metrics_html

SERIES = ("waiting", "running", "sparsity", "ttft_s")
TITLES = ("queue length", "batch size (running)", "sparsity level", "time to first token (s)")


class SchedulerDashboard(Panel):
    """Poisson load at the chosen rate against a fresh scheduler (optionally with the elastic
    controller), sampled every `sample_s` into four live plots.

    >>> dash = SchedulerDashboard(engine)            # doctest: +SKIP
    >>> dash.start.click(); dash.wait()
    """

    def __init__(self, engine, max_num_seqs: int = 4, ladder=("dense", "topk30", "topk50"), requests: int = 24,
                 rate: float = 4.0, prompt_tokens: int = 32, output_tokens: int = 16, sample_s: float = 0.25,
                 control_period_s: float = 0.5, slo_ttft_s: float = 2.0):
        super().__init__("Scheduler and elastic controller")
        from plotly.subplots import make_subplots
        import plotly.graph_objects as go
        self.engine, self.max_num_seqs, self.ladder = engine, max_num_seqs, tuple(ladder)
        self.prompt_tokens, self.output_tokens, self.sample_s = prompt_tokens, output_tokens, sample_s
        self.control_period_s, self.slo_ttft_s = control_period_s, slo_ttft_s
        self.rate = W.FloatLogSlider(value=rate, base=2, min=-2, max=6, step=0.5, description="arrivals/s",
                                     continuous_update=False)
        self.requests = W.IntSlider(value=requests, min=1, max=256, description="requests", continuous_update=False)
        self.elastic = W.Checkbox(value=True, description="elastic controller")
        self.elastic.add_class("wb-elastic")
        self.start = W.Button(description="Run load", button_style="success", icon="play")
        self.start.add_class("wb-load-start")
        self.stop = W.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.stop.add_class("wb-load-stop")
        self.metrics = W.HTML()
        fig = make_subplots(rows=4, cols=1, shared_xaxes=True, subplot_titles=TITLES, vertical_spacing=0.07)
        for i, name in enumerate(SERIES, 1):
            fig.add_trace(go.Scatter(x=[], y=[], mode="lines", name=name, line_shape="hv" if i < 4 else "linear"),
                          row=i, col=1)
        fig.update_layout(height=640, showlegend=False, margin=dict(l=50, r=20, t=40, b=40))
        fig.update_xaxes(title_text="seconds", row=4, col=1)
        self.figure = go.FigureWidget(fig)
        box = W.Box([self.figure])
        box.add_class("wb-scheduler-plots")
        for w in (self.rate, self.requests):
            w.style.description_width = "initial"
        self._box(W.HBox([self.rate, self.requests, self.elastic]), W.HBox([self.start, self.stop]), self.metrics, box)
        self.start.on_click(lambda _: self.run())
        self.stop.on_click(lambda _: self._cancel.set())
        self._cancel, self._thread = threading.Event(), None
        self.summary: dict | None = None
        self.samples: list[dict] = []

    def run(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self.wait(cancel=True, engine=self.engine)
        self._cancel.clear()
        self.start.disabled, self.stop.disabled = True, False
        self.status.value = "<span class='wb-busy' style='color:#888'>load running…</span>"
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def wait(self, cancel: bool = False, engine=None) -> None:
        if self._thread is not None and engine is None:
            if cancel:
                self._cancel.set()
            self._thread.join()
        super().wait(cancel, engine)

    def _run(self) -> None:
        base = self.engine.policy
        scheduler = controller = None
        try:
            workload = make_workload(self.engine.tokenizer, self.requests.value, self.rate.value, self.prompt_tokens,
                                     self.output_tokens)
            capacity = cache_capacity(2 * self.prompt_tokens + 2 * self.output_tokens)
            scheduler = Scheduler(self.engine, max_num_seqs=self.max_num_seqs, max_queue=4 * len(workload),
                                  max_model_len=capacity, metrics=Metrics())
            if self.elastic.value:
                controller = ElasticController(scheduler, ControllerConfig(
                    ladder=self.ladder, period_s=self.control_period_s, dwell_s=2 * self.control_period_s,
                    horizon_s=2 * self.control_period_s, slo_ttft_s=self.slo_ttft_s))
            with self.figure.batch_update():
                for trace in self.figure.data:
                    trace.x, trace.y = [], []
            self.samples = []
            requests, t0 = [], time.perf_counter()
            pending = list(workload)
            last_tick = last_sample = t0
            while (pending or not all(r.done for r in requests)) and not self._cancel.is_set():
                now = time.perf_counter()
                while pending and t0 + pending[0].arrival_s <= now:
                    item = pending.pop(0)
                    try:
                        requests.append(scheduler.submit(list(item.prompt_ids), SamplingParams(
                            max_new_tokens=item.max_new_tokens, ignore_eos=True)))
                    except QueueFull:
                        pass
                if controller is not None and now - last_tick >= self.control_period_s:
                    controller.tick()
                    last_tick = now
                if now - last_sample >= self.sample_s:
                    last_sample = now
                    self._sample(now - t0, scheduler, requests, policy_sparsity)
                time.sleep(0.01)
            if self._cancel.is_set():
                for r in requests:
                    r.cancel()
            done = [r.result() for r in requests if r.done and not r.error]
            finished = [d for d in done if d["finish_reason"] != "cancelled"]
            self._sample(time.perf_counter() - t0, scheduler, requests, policy_sparsity)
            if finished:
                self.summary = summarise(finished, time.perf_counter() - t0, self.slo_ttft_s, 10.0)
                s = self.summary
                self.metrics.value = metrics_html(
                    requests=f"{s['requests']}", tokens_per_s=f"{s['output_tokens_per_s']:.1f}",
                    ttft_p50=f"{s['ttft_p50_s']:.2f} s", ttft_p99=f"{s['ttft_p99_s']:.2f} s",
                    slo_met=f"{s['slo_met']:.0%}", moves=str(len(controller.decisions) if controller else 0),
                    policies=html.escape(", ".join(s["policies"])))
            self.status.value = (f"<span class='wb-idle' style='color:#888'>load finished: {len(finished)} "
                                 f"requests{' (stopped)' if self._cancel.is_set() else ''}</span>")
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.status.value = f"<span class='wb-error' style='color:#c62828'>{html.escape(first)}</span>"
        finally:
            if scheduler is not None:
                scheduler.close()
            if controller is not None and self.engine.policy is not base:
                self.engine.reconfigure(base)
            self.start.disabled, self.stop.disabled = False, True

    def _sample(self, t: float, scheduler, requests, policy_sparsity) -> None:
        load = scheduler.load
        recent = [r.timings.ttft_s for r in requests[-8:] if r.timings.ttft_s is not None]
        point = {"t": t, "waiting": load["waiting"], "running": load["running"],
                 "sparsity": policy_sparsity(self.engine.policy),
                 "ttft_s": sum(recent) / len(recent) if recent else math.nan}
        self.samples.append(point)
        with self.figure.batch_update():
            for trace, name in zip(self.figure.data, SERIES):
                trace.x, trace.y = (*trace.x, t), (*trace.y, point[name])
        self.metrics.value = metrics_html(t=f"{t:.1f} s", waiting=str(load["waiting"]), running=str(load["running"]),
                                          policy=html.escape(self.engine.policy.name))
