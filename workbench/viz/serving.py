"""Serving figure from a `workbench loadtest` result: throughput by mode, latency against arrival rate,
and goodput of the fixed policy against the elastic controller under overload."""
from __future__ import annotations

from typing import Mapping

from workbench.viz.tradeoff import PALETTE


def serving_figure(result: Mapping, title: str | None = None):
    """Three panels: saturation output tokens/s per mode; TTFT p50/p99 of continuous batching per rate;
    goodput (requests/s within the SLO) fixed vs elastic.

    >>> fig = serving_figure({"model": "m", "rows": [{"mode": "continuous", "rate": "inf", "output_tokens_per_s": 9.0,
    ...                       "ttft_p50_s": 0.1, "ttft_p99_s": 0.2, "goodput_rps": 1.0}]})
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    rows = [r for r in result["rows"] if "error" not in r]
    fig = make_subplots(rows=1, cols=3, subplot_titles=("saturation throughput", "continuous batching latency",
                                                        "goodput under overload"))
    sat = [r for r in rows if r["rate"] == "inf"]
    fig.add_trace(go.Bar(x=[r["mode"] for r in sat], y=[r["output_tokens_per_s"] for r in sat],
                         marker_color=[PALETTE[i % len(PALETTE)] for i in range(len(sat))], name="tokens/s",
                         hovertemplate="%{x}: %{y:.1f} output tokens/s<extra></extra>"), row=1, col=1)
    swept = sorted((r for r in rows if r["mode"] == "continuous" and r["rate"] != "inf"), key=lambda r: r["rate"])
    for key, dash in (("ttft_p50_s", "solid"), ("ttft_p99_s", "dot")):
        fig.add_trace(go.Scatter(x=[r["rate"] for r in swept], y=[r[key] for r in swept], mode="lines+markers",
                                 name=key.replace("_s", "").replace("_", " "), line=dict(dash=dash, color=PALETTE[1])),
                      row=1, col=2)
    over = [r for r in rows if r["mode"] in ("fixed", "elastic")]
    fig.add_trace(go.Bar(x=[r["mode"] for r in over], y=[r["goodput_rps"] for r in over], name="goodput",
                         marker_color=[PALETTE[3], PALETTE[2]][:len(over)],
                         customdata=[", ".join(r.get("policies", {})) for r in over],
                         hovertemplate="%{x}: %{y:.2f} req/s within the SLO<br>policies: %{customdata}<extra></extra>"),
                  row=1, col=3)
    fig.update_yaxes(title_text="output tokens/s", row=1, col=1)
    fig.update_yaxes(title_text="TTFT (s)", row=1, col=2)
    fig.update_xaxes(title_text="arrivals per second", row=1, col=2)
    fig.update_yaxes(title_text="requests/s within SLO", row=1, col=3)
    fig.update_layout(title=title or f"serving {result['model']} ({result.get('device', '')})", height=420,
                      showlegend=False)
    return fig
