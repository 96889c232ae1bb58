"""Sweep model-wide activation sparsity for every rule on one model; measure quality against the original.

    python experiments/activation_sparsity/sweep.py [--model default] [--max-tokens 2048] [--quick]

For each rule (topk, threshold, weighted, greedy) and target 0.05..0.70: KL divergence (mean, p99), top-1
agreement and perplexity on the held-out text, with the *achieved* model-wide sparsity (parameter-
weighted, measured on that text). Writes results.json / results.csv (with the environment), sweep.html /
sweep.png, and the table in README.md between its result markers. Calibration (histograms and the greedy
allocation) is computed once and cached.
"""
import argparse
import csv
import json
import re
from pathlib import Path

from workbench import Engine
from workbench.environment import environment
from workbench.sweep import sweep_sparsity
from workbench.viz import save_figure, sweep_figure

HERE = Path(__file__).resolve().parent
RULES = ["topk", "threshold", "weighted", "greedy"]
KLD_BUDGETS = [0.01, 0.05, 0.1]


def run(model: str, targets: list[float], max_tokens: int) -> list[dict]:
    return sweep_sparsity(Engine.from_pretrained(model), RULES, targets, max_tokens)


def max_sparsity_under(rows: list[dict], rule: str, budget: float) -> float:
    """Highest achieved sparsity with KLD <= budget, linearly interpolated between measured points."""
    pts = sorted((r["achieved"], r["kld_mean"]) for r in rows if r["rule"] == rule)
    best = 0.0
    for (s0, k0), (s1, k1) in zip(pts, pts[1:]):
        if k1 <= budget:
            best = s1
        elif k0 <= budget < k1:
            return s0 + (budget - k0) / (k1 - k0) * (s1 - s0)
        else:
            break
    return best


def table(rows: list[dict]) -> str:
    lines = ["| rule | achieved sparsity @ KLD≤0.01 | @ KLD≤0.05 | @ KLD≤0.1 | KLD / top-1 / ppl at 40% target "
             "| KLD / top-1 / ppl at 70% target |", "|---|---|---|---|---|---|"]
    for rule in RULES:
        at = {r["target"]: r for r in rows if r["rule"] == rule}
        cells = [f"{max_sparsity_under(rows, rule, b):.3f}" for b in KLD_BUDGETS]
        for t in (0.4, 0.7):
            r = at.get(t)
            cells.append(f"{r['kld_mean']:.3f} / {r['top1']:.3f} / {r['perplexity']:.1f}" if r else "—")
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_readme_table(text: str) -> None:
    readme = HERE / "README.md"
    body = readme.read_text()
    new = re.sub(r"(<!-- results:start -->\n).*?(\n<!-- results:end -->)", lambda m: m.group(1) + text + m.group(2),
                 body, flags=re.S)
    readme.write_text(new)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--quick", action="store_true", help="three targets only (smoke test)")
    ap.add_argument("--out", default=str(HERE), help="folder for results and figure")
    args = ap.parse_args()
    targets = [0.2, 0.4, 0.7] if args.quick else [round(0.05 * i, 2) for i in range(1, 15)]
    rows = run(args.model, targets, args.max_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "max_tokens": args.max_tokens, "targets": targets, **environment()}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "by_role"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    fig = sweep_figure(rows, "achieved", ["kld_mean", "top1", "perplexity"], "rule",
                       title=f"Activation sparsity on {args.model}: quality against achieved sparsity",
                       x_title="achieved model-wide sparsity")
    save_figure(fig, out / "sweep")
    md = table(rows)
    if out == HERE:
        write_readme_table(md)
    print(md)


if __name__ == "__main__":
    main()
