"""Sweep and trade-off figures: quality against sparsity, bytes or time, with the Pareto front."""
from __future__ import annotations

from typing import Mapping, Sequence

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def sweep_figure(rows: Sequence[Mapping], x: str, metrics: Sequence[str], group: str, title: str = "",
                 log_metrics: Sequence[str] = ("kld_mean",), x_title: str | None = None):
    """One panel per metric, one line per `group` value, `x` on the horizontal axis.

    >>> fig = sweep_figure([{"rule": "a", "s": 0.1, "kld_mean": 0.01}], "s", ["kld_mean"], "rule")
    """
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=list(metrics), horizontal_spacing=0.07)
    groups = list(dict.fromkeys(r[group] for r in rows))
    for gi, g in enumerate(groups):
        pts = sorted((r for r in rows if r[group] == g and r.get(x) is not None), key=lambda r: r[x])
        for mi, m in enumerate(metrics):
            fig.add_trace(go.Scatter(
                x=[r[x] for r in pts], y=[r[m] for r in pts], mode="lines+markers", name=str(g),
                legendgroup=str(g), showlegend=mi == 0, line=dict(color=PALETTE[gi % len(PALETTE)]),
                hovertemplate=f"{g}<br>{x}=%{{x:.3f}}<br>{m}=%{{y:.4g}}<extra></extra>"), row=1, col=mi + 1)
            fig.update_xaxes(title_text=x_title or x, row=1, col=mi + 1)
            if m in log_metrics:
                fig.update_yaxes(type="log", row=1, col=mi + 1)
    fig.update_layout(title=title, template="plotly_white", legend_title_text=group)
    return fig


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated when both coordinates are to be minimised, sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def tradeoff_figure(rows: Sequence[Mapping], x: str, y: str = "kld_mean", label: str = "policy",
                    group: str | None = None, title: str = "", x_title: str | None = None, log_y: bool = True):
    """Quality (`y`, lower is better) against cost (`x`), the Pareto front drawn as a step line."""
    import plotly.graph_objects as go
    fig = go.Figure()
    groups = list(dict.fromkeys(r[group] for r in rows)) if group else [None]
    for gi, g in enumerate(groups):
        pts = [r for r in rows if group is None or r[group] == g]
        fig.add_trace(go.Scatter(
            x=[r[x] for r in pts], y=[r[y] for r in pts], mode="markers", name=str(g) if g else "policies",
            marker=dict(size=9, color=PALETTE[gi % len(PALETTE)]), text=[str(r[label]) for r in pts],
            hovertemplate=f"%{{text}}<br>{x}=%{{x:.4g}}<br>{y}=%{{y:.4g}}<extra></extra>"))
    front = pareto_front([(r[x], r[y]) for r in rows])
    fig.add_trace(go.Scatter(x=[rows[i][x] for i in front], y=[rows[i][y] for i in front], mode="lines",
                             line=dict(shape="hv", color="black", dash="dot"), name="Pareto front"))
    fig.update_layout(title=title, template="plotly_white", xaxis_title=x_title or x, yaxis_title=y)
    if log_y:
        fig.update_yaxes(type="log")
    return fig
