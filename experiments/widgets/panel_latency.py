"""How long a panel takes from a control's change to its updated numbers and figures (the default model,
a 128-token prompt, 2 CPU cores in our runs).

    python experiments/widgets/panel_latency.py [--changes 20] [--out FILE]

For each panel, `--changes` successive changes of its main control, timed inside the panel (`panel.timings`:
reconfigure, forward pass, metrics, figure update; the generated text streams in afterwards and is not
counted). Two regimes for the sparsity slider: each change made after the previous text finished, and
back to back (the change first cancels the text still being generated). Prints median and p90, writes
panel_latency.json.
"""
import argparse
import json
import statistics
from pathlib import Path

from workbench import Engine
from workbench.corpus import load_text
from workbench.environment import environment
from workbench.widgets import AttentionExplorer, PrecisionTuner, SparsityTuner


def summary(ms: list[float]) -> dict:
    ordered = sorted(ms)
    return {"n": len(ms), "median_ms": statistics.median(ms), "p90_ms": ordered[int(0.9 * (len(ms) - 1))],
            "max_ms": ordered[-1]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--changes", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).with_name("panel_latency.json")))
    args = ap.parse_args()
    engine = Engine.from_pretrained("default")
    text, _ = load_text(None, "heldout")
    prompt = text[:4000]  # far more than 128 tokens: the panels truncate to 128
    values = [0.2, 0.3, 0.4, 0.5, 0.6, 0.35, 0.45, 0.25, 0.55, 0.3]
    results = {}

    tuner = SparsityTuner(engine, prompt=prompt, per_layer=False)
    assert len(tuner.prober.tokens) == 128
    for waited in (True, False):
        tuner.timings.clear()
        for i in range(args.changes):
            tuner.sparsity.value = values[i % len(values)] + (0.05 if waited else 0.0) * (i % 2)
            if waited:
                tuner.wait()
        results["sparsity slider, after the text finished" if waited else "sparsity slider, back to back"] = \
            summary(list(tuner.timings))
    tuner.wait()

    precision = PrecisionTuner(engine, prompt=prompt)
    formats = ["int8", "int4-g32", "int4-g64", "bf16", "none"]
    for f in formats:  # first visit packs the weights (then cached): not what a slider move costs
        precision.format.value = f
    precision.wait()
    precision.timings.clear()
    for i in range(args.changes):
        precision.format.value = formats[i % len(formats)]
        precision.wait()
    results["precision format, formats seen before"] = summary(list(precision.timings))

    explorer = AttentionExplorer(engine, prompt=prompt)  # cut to 128 tokens like the others
    explorer.timings.clear()
    for i in range(args.changes):
        explorer.budget.value = [0.1, 0.25, 0.5, 0.15, 0.35][i % 5]
    results["attention budget"] = summary(list(explorer.timings))

    out = {"model": "default", "prompt_tokens": 128, "results": results, "environment": environment()}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for name, r in results.items():
        print(f"{name:<42} median {r['median_ms']:6.0f} ms   p90 {r['p90_ms']:6.0f} ms   (n={r['n']})")


if __name__ == "__main__":
    main()
