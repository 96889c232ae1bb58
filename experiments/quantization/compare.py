"""Mixed-precision weight quantization on the default model: which policy buys the most quality per byte?

    python experiments/quantization/compare.py [--model default] [--max-tokens 2048]

Policies: uniform formats, the seed's variance rule, a llama.cpp Q4_K_M-like mixture, and `auto` (per-module
formats from measured sensitivity under a byte budget) at the sizes of its competitors; plus the seed's
"28% of the original size" point (head quantized too). For each: KLD mean/p99 and top-1 against the
unmodified model, perplexity, bits per weight of the block linears, total weight bytes and their share
of the bf16 model. Writes results.json, results.csv, pareto.html/png and the README table.
"""
import argparse
import csv
import dataclasses
import json
import re
from pathlib import Path

from workbench import Engine, Policy, PolicyError
from workbench.environment import environment
from workbench.evaluate import evaluate
from workbench.formats.mixed_precision import allocate, llamacpp_policy, variance_policy
from workbench.policy import Rule, Setting, parse_precision
from workbench.formats.sensitivity import cached_scan
from workbench.viz import save_figure, tradeoff_figure

HERE = Path(__file__).resolve().parent
UNIFORM = ["bf16", "fp8", "int8", "int8-block64", "int4-g128", "int4-g64", "int4-g64-asym", "int4-g32",
           "int4-g32-asym"]
BLOCK_ROLES = {"q", "k", "v", "o", "gate", "up", "down"}


def measure(engine, policy, max_tokens):
    engine.reconfigure(policy)
    r = evaluate(engine, max_tokens=max_tokens, progress=False)
    stats = engine.stats()
    block = [m for m in stats["modules"] if m["role"] in BLOCK_ROLES]
    return {"policy": policy.name, "kld_mean": r["kld_mean"], "kld_p99": r["kld_p99"], "top1": r["top1"],
            "perplexity": r["perplexity"], "reference_perplexity": r["reference_perplexity"],
            "block_bits_per_weight": 8 * sum(m["weight_bytes"] for m in block) / sum(m["params"] for m in block),
            "block_mb": sum(m["weight_bytes"] for m in block) / 1e6, "total_mb": stats["weight_bytes"] / 1e6,
            "share_of_bf16": stats["weight_bytes"] / stats["bf16_bytes"],
            "share_of_fp32": stats["weight_bytes"] / stats["fp32_bytes"], "tokens": r["tokens"]}


def with_head(policy: Policy, head: str) -> Policy:
    rule = Rule("role:lm_head,embed", Setting(weights=parse_precision(head)))
    return dataclasses.replace(policy, rules=(rule,) + policy.rules, name=f"{policy.name}+head:{head}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--sensitivity-tokens", type=int, default=256)
    args = ap.parse_args()
    engine = Engine.from_pretrained(args.model)
    sens = cached_scan(engine, granularity="module", tokens=args.sensitivity_tokens)
    rows, skipped = [], {}
    for label in UNIFORM:
        try:
            rows.append(measure(engine, Policy.uniform(precision=label), args.max_tokens))
        except PolicyError as e:  # e.g. a group size that does not divide this model's hidden size
            skipped[label] = str(e)
        print(rows[-1] if label not in skipped else f"{label}: {skipped[label]}", flush=True)
    for policy in (variance_policy(engine.model), llamacpp_policy(engine.model, "int4-g32"),
                   llamacpp_policy(engine.model, "int4-g64")):
        rows.append(measure(engine, policy, args.max_tokens))
        print(rows[-1], flush=True)
    # auto at the block-linear size of each competitor: equal bytes, lower predicted KLD?
    for r in list(rows):
        if r["policy"] in ("int4-g64", "int4-g32", "int8") or r["policy"].startswith("llamacpp"):
            plan = allocate(sens, budget_bytes=int(r["block_mb"] * 1e6))
            auto = dataclasses.replace(plan.policy(), name=f"auto@{r['policy']}")
            rows.append({**measure(engine, auto, args.max_tokens), "predicted_kld": plan.predicted_kld})
            print(rows[-1], flush=True)
    # the seed's claim: 28% of the original (bf16) size, head included
    stats = engine.stats()
    head_policy = with_head(Policy.identity(), "int4-g32")
    engine.reconfigure(head_policy)
    rest = engine.stats()["weight_bytes"] - sum(m["weight_bytes"] for m in engine.stats()["modules"]
                                                 if m["role"] in BLOCK_ROLES)
    budget = int(0.28 * stats["bf16_bytes"] - rest)
    seed = with_head(dataclasses.replace(allocate(sens, budget_bytes=budget).policy(), name="auto"), "int4-g32")
    rows.append(measure(engine, dataclasses.replace(seed, name="seed 28%: " + seed.name), args.max_tokens))
    print(rows[-1], flush=True)
    write(rows, skipped, args)


def write(rows, skipped, args):
    meta = {"model": args.model, "max_tokens": args.max_tokens, "sensitivity_tokens": args.sensitivity_tokens,
            "skipped": skipped, **environment()}
    (HERE / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(HERE / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    fig = tradeoff_figure(rows, "total_mb", "kld_mean", label="policy",
                          title=f"Weight formats on {args.model}: KLD against total weight MB (Pareto front dotted)",
                          x_title="total weight MB (compute path)")
    save_figure(fig, HERE / "pareto")
    lines = ["| policy | block bits/weight | total MB | % of bf16 | KLD mean | KLD p99 | top-1 | perplexity |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['block_bits_per_weight']:.2f} | {r['total_mb']:.1f} | "
                     f"{100 * r['share_of_bf16']:.1f}% | {r['kld_mean']:.4f} | {r['kld_p99']:.3f} | {r['top1']:.3f} | "
                     f"{r['perplexity']:.2f} |")
    for label, why in skipped.items():
        lines.append(f"| {label} | — | — | — | not applicable: {why} | | | |")
    table = "\n".join(lines)
    readme = HERE / "README.md"
    body = readme.read_text()
    readme.write_text(re.sub(r"(<!-- results:start -->\n).*?(\n<!-- results:end -->)",
                             lambda m: m.group(1) + table + m.group(2), body, flags=re.S))
    print(table)


if __name__ == "__main__":
    main()
