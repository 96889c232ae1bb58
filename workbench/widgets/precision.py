"""PrecisionTuner: weight formats per layer (or an automatic allocation under a memory budget), with the
memory bar, quality against the unmodified model and the generated text updating in place."""
from __future__ import annotations

import html

import ipywidgets as W

from workbench.formats.mixed_precision import with_auto_precision
from workbench.formats.sensitivity import cached_scan
from workbench.policy import QUANT_METHODS, WEIGHT_FORMATS, Policy, parse_precision
from workbench.probes import PromptProber
from workbench.widgets.panel import Panel, metrics_html
from workbench.widgets.sparsity import DEFAULT_PROMPT

# every registered format's spellings (the registry's `labels`), the model's own weights first
FORMATS = ["none"] + [label for name in WEIGHT_FORMATS.names() if name != "none"
                      for label in WEIGHT_FORMATS.get(name).labels()]


class PrecisionTuner(Panel):
    """A model-wide format, a per-layer format grid, and `auto`: formats chosen from the measured
    sensitivity scan to fit the bits-per-weight budget slider (the scan runs once and is cached)."""

    def __init__(self, engine, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 24, formats=FORMATS):
        super().__init__("Weight precision")
        from plotly import graph_objects as go
        self.engine, self.prompt, self.max_new_tokens = engine, prompt, max_new_tokens
        self.prober = PromptProber(engine, prompt)
        self.format = W.Dropdown(options=list(formats) + ["auto"], value="none", description="format")
        self.format.add_class("wb-format")
        self.budget = W.FloatSlider(value=6.0, min=4.5, max=16.0, step=0.25, description="bits/weight",
                                    continuous_update=False, readout_format=".2f")
        self.budget.add_class("wb-budget-slider")
        # how the chosen formats round: rtn, or a calibrated method (its Hessians collected once, then cached)
        self.method = W.Dropdown(options=["rtn"] + [m for m in QUANT_METHODS if m != "rtn"], value="rtn",
                                 description="rounding")
        self.method.add_class("wb-method")
        n_layers = engine.model.config.num_hidden_layers
        self.layer_formats = [W.Dropdown(options=["(model-wide)"] + list(formats), value="(model-wide)",
                                         description=f"layer {i}", layout=W.Layout(width="230px"))
                              for i in range(n_layers)]
        grid = W.GridBox(self.layer_formats, layout=W.Layout(grid_template_columns="repeat(3, 240px)"))
        acc = W.Accordion([grid])
        acc.set_title(0, "per-layer formats")
        self.metrics = W.HTML()
        self.text = W.HTML()
        self.text.add_class("wb-text")
        self.figure = go.FigureWidget(go.Figure(
            go.Bar(x=[0, 0], y=["policy", "fp32 reference"], orientation="h", marker_color=["#1f77b4", "#bbbbbb"],
                   hovertemplate="%{y}: %{x:.1f} MiB<extra></extra>"),
            layout=dict(template="plotly_white", height=200, xaxis_title="weight MiB", title="memory",
                        margin=dict(l=10, r=10, t=40, b=40))))
        figure_box = W.Box([self.figure])
        figure_box.add_class("wb-memory-bar")
        self._box(W.HBox([self.format, self.method, self.budget]), acc, self.metrics, self.text, figure_box)
        for w in [self.format, self.method, self.budget, *self.layer_formats]:
            w.observe(lambda change: self.refresh(), names="value")
        self._work(self._update)

    def policy(self) -> Policy:
        if self.format.value == "auto":
            self.status.value = "<span class='wb-busy'>measuring sensitivity (once, then cached)…</span>"
            return with_auto_precision(Policy.identity(), cached_scan(self.engine, progress=False),
                                       budget_bits=self.budget.value)
        policy = Policy.uniform(precision=self._rounded(self.format.value))
        for i, d in enumerate(self.layer_formats):
            if d.value != "(model-wide)":
                policy = policy.with_rule(f"model.layers.{i}.*", weights=parse_precision(self._rounded(d.value)))
        return policy

    def _rounded(self, label: str) -> str:
        """The format with the chosen rounding method (a format the method cannot serve is refused in
        the status line, the model unchanged)."""
        if self.method.value == "rtn" or label == "none":
            return label
        if QUANT_METHODS.get(self.method.value).needs_hessian:
            self.status.value = "<span class='wb-busy'>calibrating (once per model, then cached)…</span>"
        return f"{label}-{self.method.value}"

    def refresh(self) -> bool:
        return self._work(self._update)

    def _update(self) -> None:
        self.wait(cancel=True, engine=self.engine)  # the engine serves one caller at a time
        self.engine.reconfigure(self.policy())
        probe = self.prober.probe()
        stats = self.engine.stats()
        mib = stats["weight_bytes"] / 2**20
        with self.figure.batch_update():
            self.figure.data[0].x = [mib, stats["fp32_bytes"] / 2**20]
        bits = 8 * stats["weight_bytes"] / stats["parameters"]
        self.metrics.value = metrics_html(
            policy=html.escape(self.engine.policy.name), weight_mib=f"{mib:.1f}", bits_per_weight=f"{bits:.2f}",
            kld=f"{probe.kld_mean:.4f}", top1=f"{probe.top1:.3f}", forward_ms=f"{probe.forward_ms:.0f}")
        self.start_generation(self.engine, self.prober.text, self.max_new_tokens, self.text)
