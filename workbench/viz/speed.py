"""Decode speed figures from `workbench bench` results: ms per step by policy against the roofline, and
each policy's speed-up over dense (measured in the same run) across batch sizes."""
from __future__ import annotations

from typing import Mapping

from workbench.viz.tradeoff import PALETTE


def speed_figure(result: Mapping, title: str | None = None):
    """Grouped bars (one group per policy, one bar per batch size) of measured ms per decode step, each
    with a marker at its roofline (the bytes that step must read / measured copy bandwidth); the dense
    roofline and transformers' eager generate as reference lines.

    >>> fig = speed_figure({"model": "m", "environment": {}, "transformers_eager_ms": None, "rows": [
    ...     {"policy": "dense", "batch": 1, "ms_per_step": 2.0, "roofline_ms": 1.0}]})
    """
    import plotly.graph_objects as go
    rows = result["rows"]
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig = go.Figure()
    width = 0.8 / len(batches)
    for bi, b in enumerate(batches):
        pts = [(i, r) for i, p in enumerate(policies) for r in rows if r["policy"] == p and r["batch"] == b]
        x = [i + (bi - (len(batches) - 1) / 2) * width for i, _ in pts]
        fig.add_trace(go.Bar(
            x=x, y=[r["ms_per_step"] for _, r in pts], width=width * 0.95, name=f"batch {b}",
            marker_color=PALETTE[bi % len(PALETTE)],
            customdata=[[r["policy"], r.get("speedup_vs_dense", float("nan")), r["tokens_per_s"]] for _, r in pts],
            hovertemplate="%{customdata[0]}<br>%{y:.2f} ms/step<br>%{customdata[1]:.2f}x dense<br>"
                          "%{customdata[2]:.0f} tok/s<extra>batch " + str(b) + "</extra>"))
        fig.add_trace(go.Scatter(  # each bar's own bound: the bytes its step reads / copy bandwidth
            x=x, y=[r["roofline_ms"] for _, r in pts], mode="markers", name="roofline", legendgroup="roofline",
            showlegend=bi == 0, marker=dict(symbol="line-ew", size=26, color="black", line=dict(width=3, color="black")),
            customdata=[r["policy"] for _, r in pts], hovertemplate="%{customdata}: roofline %{y:.2f} ms<extra></extra>"))
    fig.update_xaxes(tickvals=list(range(len(policies))), ticktext=policies)
    dense = next((r for r in rows if r["policy"] == "dense" and r["batch"] == batches[0]), None)
    if dense and dense.get("roofline_ms"):
        fig.add_hline(y=dense["roofline_ms"], line_dash="dot", line_color="gray",
                      annotation_text=f"dense roofline {dense['roofline_ms']:.2f} ms", annotation_position="top left")
    hf = result.get("transformers_eager_ms")
    if hf:
        fig.add_annotation(xref="paper", yref="paper", x=1, y=1.08, showarrow=False,
                           text=f"transformers eager generate, dense batch 1: {hf:.1f} ms/token")
    env = result.get("environment", {})
    device = env.get("gpu") or env.get("cpu") or ""
    fig.update_layout(template="plotly_white", yaxis_title="ms per decode step",
                      title=title or f"{result['model']} decode on {device}", legend_title_text="")
    return fig


def speedup_figure(results: list[Mapping], targets: Mapping[str, Mapping[int, float]] | None = None,
                   title: str | None = None):
    """One line per compressed policy: speed-up over dense at each batch size, each ratio taken within its
    own run (`speedup_vs_dense`), so several runs (each with its dense rows) can share the figure. `targets`
    (policy -> batch -> ratio) draws open markers at the ratios a policy should reach; 1.0 is dense.

    >>> fig = speedup_figure([{"rows": [{"policy": "dense", "batch": 1, "speedup_vs_dense": 1.0},
    ...                                  {"policy": "int8", "batch": 1, "speedup_vs_dense": 1.5}]}],
    ...                      {"int8": {1: 1.6}})
    >>> [t.name for t in fig.data]
    ['int8', 'int8 target']
    """
    import plotly.graph_objects as go
    rows = [r for res in results for r in res["rows"] if r["policy"] != "dense" and r.get("pdl", True)
            and r.get("speedup_vs_dense")]
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fig = go.Figure()
    for i, policy in enumerate(policies):
        pts = sorted((r["batch"], r["speedup_vs_dense"]) for r in rows if r["policy"] == policy)
        color = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(x=[b for b, _ in pts], y=[v for _, v in pts], mode="lines+markers", name=policy, line=dict(color=color),
                                 hovertemplate=policy + "<br>batch %{x}: %{y:.2f}x dense<extra></extra>"))
        goal = (targets or {}).get(policy)
        if goal:
            fig.add_trace(go.Scatter(x=list(goal), y=list(goal.values()), mode="markers", name=f"{policy} target",
                                     marker=dict(symbol="circle-open", size=13, color=color, line=dict(width=2)),
                                     hovertemplate=policy + " target<br>batch %{x}: %{y:.2f}x<extra></extra>"))
    fig.add_hline(y=1.0, line_dash="dot", line_color="gray", annotation_text="dense", annotation_position="bottom right")
    fig.update_xaxes(type="log", title="batch size (tokens per decode step)",
                     tickvals=sorted({r["batch"] for r in rows}))
    fig.update_layout(template="plotly_white", yaxis_title="speed-up over dense (same run)", legend_title_text="",
                      title=title or "decode speed-up over dense by batch size")
    return fig
