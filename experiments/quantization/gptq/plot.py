"""KLD against bits per weight for every rounding method, one panel per model, from this folder's results:
eval_*.json (the default model, `run.sh`) and gemma3_*.json (Gemma 3 270M, `gemma3.sh`).

    .venv/bin/python experiments/quantization/gptq/plot.py      # writes methods.html and methods.png here
"""
import json
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

HERE = Path(__file__).resolve().parent
WIDTHS = ("int4-g32", "int4-g64", "int4-g128", "int3-g64", "int2-g64")
METHODS = {"rtn": "round to nearest", "gptq": "GPTQ", "imatrix": "importance-weighted", "awq": "activation-aware"}
MODELS = {"default model (SmolLM2-135M)": lambda w, m: HERE / f"eval_{w}{'' if m == 'rtn' else '-' + m}.json",
          "Gemma 3 270M": lambda w, m: HERE / f"gemma3_{w}-{m}.json"}


def bits_per_weight(e: dict) -> float:
    packed = sum(v for k, v in e["weight_bytes_by_format"].items() if k not in ("float32", "bfloat16", "float16"))
    return 8 * packed / (e["reference_bytes"] / 4)


def main() -> None:
    fig = make_subplots(rows=1, cols=len(MODELS), subplot_titles=list(MODELS), shared_yaxes=True,
                        horizontal_spacing=0.05)
    colors = dict(zip(METHODS, ("#888888", "#1f77b4", "#2ca02c", "#ff7f0e")))
    for c, (model, path) in enumerate(MODELS.items(), start=1):
        for method, label in METHODS.items():
            rows = [json.loads(path(w, method).read_text()) for w in WIDTHS if path(w, method).exists()]
            fig.add_trace(go.Scatter(x=[bits_per_weight(e) for e in rows], y=[e["kld_mean"] for e in rows],
                                     mode="lines+markers", name=label, legendgroup=method, showlegend=c == 1,
                                     line=dict(color=colors[method]),
                                     text=[e["policy"] for e in rows], hovertemplate="%{text}: KLD %{y:.4f}"),
                          row=1, col=c)
        fig.update_xaxes(title_text="bits per weight (block linears, as packed)", row=1, col=c)
    fig.update_yaxes(type="log")
    fig.update_yaxes(title_text="KLD against the unmodified model (log)", row=1, col=1)
    fig.update_layout(title="Calibrated rounding against round-to-nearest, int4-g32 to int2-g64 "
                            "(4096 held-out tokens)", height=460, width=1100)
    fig.write_html(HERE / "methods.html", include_plotlyjs="cdn")
    fig.write_image(HERE / "methods.png", scale=2)


if __name__ == "__main__":
    main()
