"""SparsityTuner: drag activation sparsity and watch text, quality, the layer x token map and latency move."""
from __future__ import annotations

import html

import ipywidgets as W

from workbench.policy import DEFAULT_SPARSITY_RULE, SPARSITY_RULES, Policy, parse_sparsity
from workbench.probes import PromptProber
from workbench.widgets.panel import Panel, metrics_html

DEFAULT_PROMPT = ("Explain in two sentences why the sky is blue, then give one everyday example of light "
                  "scattering that a child could notice.")


class SparsityTuner(Panel):
    """Model-wide sparsity slider, rule dropdown and optional per-layer sliders, driving the real engine.

    On every change: `engine.reconfigure`, one forward over the prompt (KLD and top-1 against the
    unmodified model, achieved sparsity per layer and token, latency), then the prompt's continuation is
    generated in the background and the text updates when it is ready.

    >>> tuner = SparsityTuner(engine)            # doctest: +SKIP
    >>> tuner.sparsity.value = 0.5               # what dragging the slider does
    """

    def __init__(self, engine, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 24,
                 rules: tuple[str, ...] | None = None, per_layer: bool = True):
        rules = rules or tuple(sorted((n for n in SPARSITY_RULES.names() if n != "dense"),
                                      key=lambda n: n != DEFAULT_SPARSITY_RULE))  # the registry's, top-k first
        super().__init__("Activation sparsity")
        from plotly import graph_objects as go

        from workbench.viz import sparsity_heatmap
        self.engine, self.max_new_tokens, self.prompt = engine, max_new_tokens, prompt
        self.prober = PromptProber(engine, prompt)
        self.sparsity = W.FloatSlider(value=0.0, min=0.0, max=0.9, step=0.05, description="sparsity",
                                      continuous_update=False, readout_format=".2f")
        self.sparsity.add_class("wb-sparsity-slider")
        self.rule = W.Dropdown(options=list(rules), value=rules[0], description="rule")
        self.rule.add_class("wb-rule")
        n_layers = engine.model.config.num_hidden_layers
        self.layer_sliders = [W.FloatSlider(value=-0.05, min=-0.05, max=0.9, step=0.05, description=f"layer {i}",
                                            continuous_update=False, readout_format=".2f")
                              for i in range(n_layers)] if per_layer else []
        self.metrics = W.HTML()
        self.text = W.HTML()
        self.text.add_class("wb-text")
        probe = self.prober.probe()
        self.figure = go.FigureWidget(sparsity_heatmap(probe.layers, self._labels(probe.tokens), probe.token_sparsity,
                                                       title="achieved sparsity by layer and token",
                                                       column_title="token"))
        self.figure.layout.height = 520
        figure_box = W.Box([self.figure])
        figure_box.add_class("wb-sparsity-map")
        controls = [W.HBox([self.sparsity, self.rule])]
        if per_layer:
            acc = W.Accordion([W.VBox([W.HTML("per-layer override (left end: follow the model-wide value)"),
                                       *self.layer_sliders])])
            acc.set_title(0, "per-layer sparsity")
            controls.append(acc)
        self._box(*controls, self.metrics, self.text, figure_box)
        for w in [self.sparsity, self.rule, *self.layer_sliders]:
            w.observe(lambda change: self.refresh(), names="value")
        self._work(self._update)

    @staticmethod
    def _labels(tokens):
        return [f"{i}:{t.strip() or repr(t)}" for i, t in enumerate(tokens)]  # unique, readable columns

    def policy(self) -> Policy:
        rule = self.rule.value
        policy = Policy.uniform(self.sparsity.value, rule if self.sparsity.value else None)
        for i, s in enumerate(self.layer_sliders):
            if s.value >= 0:
                policy = policy.with_rule(f"model.layers.{i}.*", sparsity=parse_sparsity(s.value, rule if s.value else None))
        return policy

    def refresh(self) -> bool:
        return self._work(self._update)

    def _update(self) -> None:
        self.wait(cancel=True, engine=self.engine)  # one engine user at a time: the stale continuation stops at its next token
        self.engine.reconfigure(self.policy())
        probe = self.prober.probe()
        stats = self.engine.stats()
        achieved = (stats["achieved_sparsity"] or {}).get("overall")
        with self.figure.batch_update():
            self.figure.data[0].z = probe.token_sparsity
        self.metrics.value = metrics_html(
            policy=html.escape(self.engine.policy.name), kld=f"{probe.kld_mean:.4f}", top1=f"{probe.top1:.3f}",
            achieved_sparsity="-" if achieved is None else f"{achieved:.3f}",
            forward_ms=f"{probe.forward_ms:.0f}")
        self.start_generation(self.engine, self.prober.text, self.max_new_tokens, self.text)
