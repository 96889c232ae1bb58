"""Attention views: one head's map with token labels, dense versus selected keys, a layer x head grid.

Inputs are plain arrays from `workbench.attention.capture.capture_attention` (or anywhere): probabilities
(T, T) and a boolean kept mask (T, T). Long prompts are downsampled by max-pooling to at most
`max_cells` per side, and the figure says so, so a 512-token map stays responsive in a browser.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _downsample(a: np.ndarray, max_cells: int) -> tuple[np.ndarray, int]:
    t = a.shape[-1]
    step = max(1, -(-t // max_cells))
    if step == 1:
        return a, 1
    n = -(-t // step)
    padded = np.zeros(a.shape[:-2] + (n * step, n * step), dtype=np.float32)
    padded[..., :t, :t] = a
    return padded.reshape(*a.shape[:-2], n, step, n, step).max(axis=(-3, -1)), step


def attention_heatmap(probs, tokens: Sequence[str], selected=None, title: str = "attention",
                      max_cells: int = 128):
    """One head: queries down, keys across; selected keys outlined when a mask is given."""
    import plotly.graph_objects as go
    p = np.asarray(probs, dtype=np.float32)
    z, step = _downsample(p, max_cells)
    # index-prefixed labels: plotly merges equal category names, and prompts repeat words
    labels = ([f"{i}:{t.strip() or repr(t)}" for i, t in enumerate(tokens)] if step == 1
              else [f"{i * step}" for i in range(z.shape[0])])
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=labels, colorscale="Blues", zmin=0,
                               colorbar=dict(title="probability"),
                               hovertemplate="query %{y}<br>key %{x}<br>p=%{z:.3f}<extra></extra>"))
    if selected is not None:
        s, _ = _downsample(np.asarray(selected, dtype=np.float32), max_cells)
        dropped = np.where((s == 0) & (z > 0), z, np.nan)
        fig.add_trace(go.Heatmap(z=dropped, x=labels, y=labels, colorscale=[[0, "#d62728"], [1, "#d62728"]],
                                 showscale=False, opacity=0.55, name="dropped by the selector",
                                 hovertemplate="dropped: query %{y}<br>key %{x}<br>p=%{z:.3f}<extra></extra>"))
    note = f" (max-pooled {step}x{step})" if step > 1 else ""
    fig.update_layout(title=title + note, template="plotly_white", xaxis_title="key", yaxis_title="query",
                      yaxis=dict(autorange="reversed"), height=560)
    return fig


def recall_of(probs, selected) -> float:
    """Share of the attention mass on the selected keys, averaged over queries."""
    p = np.asarray(probs, dtype=np.float32)
    return float((p * np.asarray(selected, dtype=bool)).sum(-1).mean())


def attention_grid(dense: dict, layers: Sequence[int], heads: Sequence[int], selected: dict | None = None,
                   max_cells: int = 48, title: str = "attention by layer and head"):
    """Thumbnails: one small map per (layer, head); with `selected`, each titled with its recall."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go
    titles = []
    for l in layers:
        for hi, h in enumerate(heads):
            r = f" r={recall_of(dense[l][hi], selected[l][hi]):.2f}" if selected is not None else ""
            titles.append(f"L{l} H{h}{r}")
    t = np.asarray(dense[layers[0]][0]).shape[-1]
    step = max(1, -(-t // max_cells))
    if step > 1:  # say on the figure that what it shows is pooled
        title = f"{title} (each map max-pooled {step}x{step} from {t} tokens)"
    fig = make_subplots(rows=len(layers), cols=len(heads), subplot_titles=titles,
                        horizontal_spacing=0.01, vertical_spacing=min(0.03, 0.5 / max(1, len(layers))))
    for li, l in enumerate(layers):
        for hi, _ in enumerate(heads):
            z, _ = _downsample(np.asarray(dense[l][hi], dtype=np.float32), max_cells)
            fig.add_trace(go.Heatmap(z=z, colorscale="Blues", showscale=False, zmin=0,
                                     hovertemplate="q %{y} k %{x} p=%{z:.3f}<extra></extra>"), row=li + 1, col=hi + 1)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    fig.update_layout(title=title, template="plotly_white", height=140 * len(layers) + 100,
                      margin=dict(l=10, r=10, t=80, b=10))
    fig.update_annotations(font_size=9)
    return fig


def needle_figure(result: dict):
    """`attention.needle.needle_probe`'s result as one heat map per prompt length: selectors (rows) x budgets
    (columns), coloured by the share of (depth, code) points whose code came out exactly; each cell says
    found / points and the answer's mean log-probability; dense in each panel's title."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from workbench.attention.needle import needle_summary
    lengths, budgets, selectors = result["lengths"], result["budgets"], result["selectors"]
    by = {(r["length"], r["policy"]): r for r in needle_summary(result)}

    def title(n):
        d = by.get((n, "dense"))
        return f"{n} tokens (dense: {d['found']}/{d['n']})" if d else f"{n} tokens"
    fig = make_subplots(rows=1, cols=len(lengths), shared_yaxes=True, subplot_titles=[title(n) for n in lengths],
                        horizontal_spacing=0.04)
    for c, n in enumerate(lengths, start=1):
        cells = [[by.get((n, sel.format(b=b))) for b in budgets] for sel in selectors]
        fig.add_trace(go.Heatmap(z=[[r["found_rate"] if r else None for r in row] for row in cells],
                                 x=[str(b) for b in budgets], y=[sel.split(":")[0] for sel in selectors],
                                 text=[[f"{r['found']}/{r['n']}<br>{r['logprob']:.2f}" if r else "" for r in row]
                                       for row in cells],
                                 texttemplate="%{text}", zmin=0, zmax=1, colorscale="Viridis",
                                 showscale=c == len(lengths), colorbar=dict(title="found")), row=1, col=c)
        fig.update_xaxes(title_text="keys kept per query", type="category", row=1, col=c)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title="Needle in a haystack: dense prefill, sparse decode<br>"
                            "<sup>cell: codes found / points, and the answer's mean log p</sup>",
                      height=430, width=max(720, 330 * len(lengths) + 220))
    return fig
