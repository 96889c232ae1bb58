"""LoRA figures: training loss curves, and held-out KLD before / after recovery / after merging."""
from __future__ import annotations

from typing import Mapping, Sequence

from workbench.viz.tradeoff import PALETTE


def loss_figure(histories: Mapping[str, Sequence[float]] | None = None, title: str = "training loss", widget=False):
    """One line per run (name -> loss per optimizer step). `widget=True` returns a FigureWidget whose
    first trace a live trainer extends step by step.

    >>> loss_figure({"kl": [0.8, 0.6, 0.5]}).data[0].y
    (0.8, 0.6, 0.5)
    """
    import plotly.graph_objects as go
    histories = dict(histories or {"loss": []})
    fig = (go.FigureWidget if widget else go.Figure)()
    for i, (name, losses) in enumerate(histories.items()):
        fig.add_trace(go.Scatter(x=list(range(1, len(losses) + 1)), y=list(losses), mode="lines", name=name,
                                 line=dict(color=PALETTE[i % len(PALETTE)])))
    fig.update_layout(title=title, xaxis_title="optimizer step", yaxis_title="loss", height=320,
                      margin=dict(l=50, r=20, t=50, b=40), showlegend=len(histories) > 1)
    return fig


def recovery_figure(result: Mapping, title: str | None = None):
    """Grouped bars per run (policy / loss): held-out KLD before training, with the adapters, and merged.

    >>> s = {"kld_mean": 0.5, "top1": 0.6}
    >>> fig = recovery_figure({"model": "m", "rows": [{"policy": "p", "loss": "kl", "before": s, "after": s,
    ...                        "merged": s, "recovered": 0.0}]})
    """
    import plotly.graph_objects as go
    rows = result["rows"]
    labels = [f"{r['policy']}<br>{r['loss']} loss" for r in rows]
    fig = go.Figure()
    for i, (stage, name) in enumerate((("before", "compressed"), ("after", "+ LoRA"), ("merged", "merged"))):
        fig.add_trace(go.Bar(x=labels, y=[r[stage]["kld_mean"] for r in rows], name=name,
                             marker_color=PALETTE[i % len(PALETTE)],
                             customdata=[r[stage]["top1"] for r in rows],
                             hovertemplate="KLD %{y:.4f}<br>top-1 %{customdata:.3f}<extra>" + name + "</extra>"))
    for label, r in zip(labels, rows):
        fig.add_annotation(x=label, y=r["before"]["kld_mean"], text=f"-{r['recovered']:.0%}", showarrow=False,
                           yshift=12)
    fig.update_layout(barmode="group", title=title or f"LoRA recovery of held-out KLD ({result['model']})",
                      yaxis_title="KLD to the unmodified model (nats/token)", height=420)
    return fig
