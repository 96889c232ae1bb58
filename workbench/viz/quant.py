"""Quantization views: per-layer sensitivity by format, and the error map of one weight's blocks."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def sensitivity_heatmap(layers: Sequence, formats: Sequence[str], matrix, title: str = "quantization sensitivity"):
    """Layers down, formats across, colour = KLD (log scale) when only that layer is quantized."""

    import plotly.graph_objects as go
    z = [[math.log10(max(v, 1e-9)) for v in row] for row in matrix]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(formats), y=[str(l) for l in layers], colorscale="Magma", reversescale=True,
        customdata=matrix, colorbar=dict(title="log10 KLD"),
        hovertemplate="layer %{y}<br>%{x}<br>KLD %{customdata:.3g}<extra></extra>"))
    fig.update_layout(title=title, template="plotly_white", xaxis_title="format", yaxis_title="layer",
                      yaxis=dict(autorange="reversed"), height=max(320, 18 * len(layers) + 140))
    return fig


def block_error_heatmap(error, block: int, title: str = "quantization error by block"):
    """Mean |W - W_q| per block x block tile of one weight matrix (a 2-D array, N x K)."""
    import plotly.graph_objects as go
    e = np.asarray(error, dtype=np.float64)
    n, k = e.shape[0] // block, e.shape[1] // block
    tiles = np.abs(e[: n * block, : k * block]).reshape(n, block, k, block).mean(axis=(1, 3))
    fig = go.Figure(go.Heatmap(z=tiles, colorscale="Inferno", colorbar=dict(title="mean |error|"),
                               hovertemplate="row block %{y}<br>column block %{x}<br>%{z:.3g}<extra></extra>"))
    fig.update_layout(title=title, template="plotly_white", xaxis_title=f"input block ({block})",
                      yaxis_title=f"output block ({block})", yaxis=dict(autorange="reversed"))
    return fig
