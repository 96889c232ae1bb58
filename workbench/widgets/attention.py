"""AttentionExplorer: one head's attention on a prompt, with the keys a sparse selector keeps and its recall."""
from __future__ import annotations

import html

import ipywidgets as W
import numpy as np

from workbench.attention.capture import capture_attention
from workbench.policy import ATTENTION_SELECTORS, Policy
from workbench.widgets.panel import Panel, metrics_html

# the registry's selectors: top-k first (the panel opens on it), dense last
SELECTORS = sorted(ATTENTION_SELECTORS.names(), key=lambda name: (name != "topk", name == "dense"))


class AttentionExplorer(Panel):
    """Prompt box, layer and head pickers, selector and budget (share of keys); the heat map shows the
    dense attention with the keys the selector drops in red, and the recall (attention mass kept).
    The prompt is cut to `max_tokens` (128: the map stays one cell per token pair and the update fast);
    larger maps are max-pooled to 128 x 128 cells, said in the figure's title."""

    def __init__(self, engine, prompt: str = "The quick brown fox jumps over the lazy dog. " * 4,
                 selectors=SELECTORS, max_tokens: int = 128):
        super().__init__("Sparse attention")
        from plotly import graph_objects as go

        from workbench.viz import attention_heatmap
        self.engine, self.max_tokens = engine, max_tokens
        cfg = engine.model.config
        self.prompt = W.Textarea(value=prompt, description="prompt", layout=W.Layout(width="95%", height="60px"))
        self.prompt.add_class("wb-prompt")
        self.run = W.Button(description="run prompt")
        self.layer = W.BoundedIntText(value=cfg.num_hidden_layers // 2, min=0, max=cfg.num_hidden_layers - 1,
                                      description="layer", layout=W.Layout(width="160px"))
        self.head = W.BoundedIntText(value=0, min=0, max=cfg.num_attention_heads - 1, description="head",
                                     layout=W.Layout(width="160px"))
        self.selector = W.Dropdown(options=list(selectors), value=selectors[0], description="selector")
        self.budget = W.FloatSlider(value=0.25, min=0.05, max=1.0, step=0.05, description="budget",
                                    continuous_update=False, readout_format=".2f")
        self.budget.add_class("wb-attention-budget")
        self.metrics = W.HTML()
        self.figure = go.FigureWidget(attention_heatmap(np.zeros((2, 2)), ["", " "], np.ones((2, 2))))
        figure_box = W.Box([self.figure])
        figure_box.add_class("wb-attention-map")
        self._box(self.prompt, W.HBox([self.run, self.layer, self.head]), W.HBox([self.selector, self.budget]),
                  self.metrics, figure_box)
        for w in (self.layer, self.head, self.selector, self.budget):
            w.observe(lambda change: self.refresh(), names="value")
        self.run.on_click(lambda _: self.refresh())
        self._work(self._update)

    def policy(self, tokens: int) -> Policy:
        """The selector at the budget slider's share of keys (window and hierarchical in their own terms)."""
        sel, share = self.selector.value, self.budget.value
        if sel == "dense":
            return Policy.uniform()
        if sel == "window":  # 4 sink tokens + the most recent keys
            return Policy.uniform(attention=f"window:4+{max(1, round(share * tokens))}")
        if sel == "hierarchical":
            return Policy.uniform(attention=f"hierarchical:32/128,{share:.2f}")
        return Policy.uniform(attention=f"{sel}:{share:.2f}")

    def refresh(self) -> bool:
        return self._work(self._update)

    def _update(self) -> None:
        from workbench.viz import attention_heatmap
        self.wait(cancel=True, engine=self.engine)  # another panel's text generation yields the engine
        tokens = min(self.max_tokens, len(self.engine.encode([self.prompt.value], chat=False)["input_ids"][0]))
        self.engine.reconfigure(self.policy(tokens))
        layer, head = int(self.layer.value), int(self.head.value)
        cap = capture_attention(self.engine, self.prompt.value, layers=[layer], heads=[head], max_tokens=self.max_tokens)
        dense, kept = cap["dense"][layer][0].astype(np.float32), cap["selected"][layer][0]
        fresh = attention_heatmap(dense, cap["tokens"], kept, title=f"layer {layer}, head {head}")
        with self.figure.batch_update():
            for trace, new in zip(self.figure.data, fresh.data):
                trace.z, trace.x, trace.y = new.z, new.x, new.y
            if len(self.figure.data) < len(fresh.data):
                self.figure.add_trace(fresh.data[-1])
            self.figure.layout.title = fresh.layout.title
        recall = cap["recall"][layer][0]
        kept_share = float(kept.sum() / max(1, np.tril(np.ones_like(kept)).sum()))
        self.metrics.value = metrics_html(policy=html.escape(self.engine.policy.name), recall=f"{recall:.3f}",
                                          keys_kept=f"{kept_share:.2f}", tokens=len(cap["tokens"]))
