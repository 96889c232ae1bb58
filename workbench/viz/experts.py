"""Expert load of a mixture-of-experts model: layers x experts, coloured by each expert's share of the
routing choices in its layer (`workbench.expert_load.expert_load`'s dict in, a plotly heat map out)."""
from __future__ import annotations


def expert_load_figure(load: dict, title: str = "Expert load"):
    import plotly.graph_objects as go
    shares = [[c / max(1, sum(row)) for c in row] for row in load["counts"]]
    n = len(load["counts"][0])
    fig = go.Figure(go.Heatmap(
        z=shares, x=[str(e) for e in range(n)], y=[f"layer {i}" for i in load["layers"]], colorscale="Viridis",
        zmin=0, colorbar=dict(title="share"),
        customdata=load["counts"], hovertemplate="%{y}, expert %{x}: %{customdata} choices (%{z:.1%})<extra></extra>"))
    worst = max(load["imbalance"])
    fig.update_layout(title=f"{title}: {sum(load['tokens'])} routed tokens; busiest expert {worst:.2f}x its "
                            f"layer's mean (1.00: even)", xaxis_title="routed expert", height=160 + 28 * len(shares),
                      width=max(520, 40 + 22 * n))
    fig.update_yaxes(autorange="reversed")
    return fig
