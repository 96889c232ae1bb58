"""Sparse attention selectors on the default model: quality and recall against the key budget.

    python experiments/sparse_attention/sweep.py [--contexts 512,2048] [--budgets 0.05,0.1,0.25,0.5]

For each context length (one held-out window of that many tokens), selector and budget (a fraction of
each query's context; `window` gets sinks=4 plus the rest as its window): KLD mean/p99 and top-1 against
the dense model, and recall (the share of dense attention mass the selection kept). Writes
results_<contexts>.json/csv, figure sweep.html/png and the README table.
"""
import argparse
import csv
import json
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from workbench import Engine, Policy
from workbench.environment import environment
from workbench.evaluate import evaluate
from workbench.policy import Attention, Setting
from workbench.viz import save_figure, sweep_figure

HERE = Path(__file__).resolve().parent
SELECTORS = ["topk", "indexer", "block", "window", "hierarchical"]


def spec_for(selector: str, budget: float, context: int) -> Attention:
    if selector == "window":
        return Attention("window", params={"sinks": 4, "window": max(1, round(budget * context) - 4)})
    if selector == "hierarchical":
        return Attention("hierarchical", budget=budget, params={"local": 32, "regional": 128})
    return Attention(selector, budget=budget)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--budgets", default="0.05,0.1,0.25,0.5")
    ap.add_argument("--selectors", default=",".join(SELECTORS))
    ap.add_argument("--report-only", action="store_true", help="redo figures and table from the results file")
    ap.add_argument("--dtype", default="float32", help="model dtype (float32 everywhere for comparable numbers)")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    selectors = args.selectors.split(",")
    tag = "_".join(map(str, contexts))
    results = HERE / f"results_{tag}.json"
    if args.report_only:  # figures and table again from a results file (e.g. one measured on a GPU)
        rows = json.loads(results.read_text())["rows"]
    else:
        rows = measure(args.model, contexts, selectors, budgets, getattr(torch, args.dtype))
        meta = {"model": args.model, "contexts": contexts, "budgets": budgets, **environment()}
        results.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        with open(HERE / f"results_{tag}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    report(rows, args.model, contexts, selectors, budgets, tag)


def measure(model, contexts, selectors, budgets, dtype):
    engine = Engine.from_pretrained(model, dtype=dtype)
    rows = []
    jobs = [(c, s, b) for c in contexts for s in selectors for b in budgets]
    for context, selector, budget in tqdm(jobs, desc="sparse attention"):
        spec = spec_for(selector, budget, context)
        engine.reconfigure(Policy(default=Setting(attention=spec), name=f"{selector}:{budget}"))
        r = evaluate(engine, seq_len=context, max_tokens=context - 1, progress=False)
        rows.append({"context": context, "selector": selector, "budget": budget, "kld_mean": r["kld_mean"],
                     "kld_p99": r["kld_p99"], "top1": r["top1"], "recall": r["attention_recall"],
                     "perplexity": r["perplexity"], "reference_perplexity": r["reference_perplexity"],
                     "tokens": r["tokens"], "seconds": r["seconds"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def report(rows, model, contexts, selectors, budgets, tag):
    for context in contexts:
        sub = [r for r in rows if r["context"] == context]
        fig = sweep_figure(sub, "budget", ["kld_mean", "top1", "recall"], "selector",
                           title=f"Sparse attention on {model}, {context}-token context",
                           x_title="key budget (fraction of context)")
        save_figure(fig, HERE / f"sweep_{context}")
    lines = ["| context | selector | " + " | ".join(f"budget {b:g}: KLD / top-1 / recall" for b in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for context in contexts:
        for s in selectors:
            cells = []
            for b in budgets:
                r = next(r for r in rows if r["context"] == context and r["selector"] == s and r["budget"] == b)
                cells.append(f"{r['kld_mean']:.4f} / {r['top1']:.3f} / {r['recall']:.3f}")
            lines.append(f"| {context} | {s} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    readme = HERE / "README.md"
    body = readme.read_text()
    marker = f"results-{tag}"
    if f"<!-- {marker}:start -->" not in body:
        body += f"\n<!-- {marker}:start -->\n<!-- {marker}:end -->\n"
    readme.write_text(re.sub(rf"(<!-- {marker}:start -->\n).*?(\n?<!-- {marker}:end -->)",
                             lambda m: m.group(1) + table + "\n" + m.group(2).lstrip("\n"), body, flags=re.S))
    print(table)


if __name__ == "__main__":
    main()
