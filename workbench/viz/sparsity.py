"""Activation-sparsity maps: achieved sparsity per layer and role (and per layer and token)."""
from __future__ import annotations

import re
from typing import Mapping, Sequence

ROLE_ORDER = ["q", "k", "v", "q_a", "q_b", "kv_a", "kv_b", "o", "gate", "up", "down"]


def layer_role_matrix(modules: Sequence[Mapping]) -> tuple[list[int], list[str], list[list[float | None]]]:
    """(layers, roles, matrix[layer][role]) of achieved sparsity from `engine.stats()["modules"]` rows.

    Modules of the same layer and role (shared experts, say) are averaged by parameters.
    """
    cells: dict[tuple[int, str], list[float]] = {}
    for m in modules:
        layer = re.search(r"layers\.(\d+)\.", m["fqn"])
        if layer is None or m.get("role") not in ROLE_ORDER:
            continue
        a = m.get("achieved_sparsity")
        acc = cells.setdefault((int(layer.group(1)), m["role"]), [0.0, 0.0])
        acc[0] += (a or 0.0) * m["params"]
        acc[1] += m["params"]
    layers = sorted({k[0] for k in cells})
    roles = [r for r in ROLE_ORDER if any(k[1] == r for k in cells)]
    matrix = [[cells[(l, r)][0] / cells[(l, r)][1] if (l, r) in cells else None for r in roles] for l in layers]
    return layers, roles, matrix


def sparsity_heatmap(layers: Sequence, columns: Sequence[str], matrix, title: str = "achieved sparsity",
                     column_title: str = "role"):
    """Layers down, roles (or tokens) across, colour = achieved sparsity in [0, 1]."""
    import plotly.graph_objects as go
    fig = go.Figure(go.Heatmap(
        z=matrix, x=list(columns), y=[str(l) for l in layers], zmin=0, zmax=1, colorscale="Viridis",
        colorbar=dict(title="sparsity"),
        hovertemplate=f"layer %{{y}}<br>{column_title} %{{x}}<br>sparsity %{{z:.3f}}<extra></extra>"))
    fig.update_layout(title=title, template="plotly_white", xaxis_title=column_title, yaxis_title="layer",
                      yaxis=dict(autorange="reversed"), height=max(320, 18 * len(layers) + 140))
    return fig
