"""Sweeps: evaluate a family of policies on one engine and return plain rows for tables and figures."""
from __future__ import annotations

from itertools import product
from typing import Iterable, Sequence

from workbench.evaluate import evaluate
from workbench.policy import Policy
from workbench.progress import progress as bar


def sparsity_row(rule: str, target: float, result: dict) -> dict:
    sp = result["achieved_sparsity"] or {"overall": 0.0, "by_role": {}}
    return {"rule": rule, "target": target, "achieved": round(sp["overall"], 4),
            "kld_mean": result["kld_mean"], "kld_p99": result["kld_p99"], "top1": result["top1"],
            "perplexity": result["perplexity"], "reference_perplexity": result["reference_perplexity"],
            "tokens": result["tokens"], "by_role": {k: round(v, 4) for k, v in sp["by_role"].items()}}


def sweep_sparsity(engine, rules: Sequence[str], targets: Iterable[float], max_tokens: int = 2048,
                   progress: bool = True) -> list[dict]:
    """One row per (rule, target) with achieved sparsity and quality; target 0 is the dense baseline.

    >>> from workbench import Engine
    >>> rows = sweep_sparsity(Engine.from_pretrained("synthetic:tiny-llama"), ["topk"], [0.5], 64, False)
    >>> [r["target"] for r in rows]
    [0.0, 0.5]
    """
    targets = [t for t in targets if t > 0]
    saved = engine.policy
    jobs = [(rule, t) for rule in rules for t in targets]
    try:
        engine.reconfigure(Policy.identity())
        base = evaluate(engine, max_tokens=max_tokens, progress=False)
        rows = [sparsity_row(rule, 0.0, base) for rule in rules]
        for rule, target in bar(jobs, desc="sparsity sweep", unit="policy", enabled=progress):
            engine.reconfigure(Policy.uniform(sparsity=target, rule=rule))
            rows.append(sparsity_row(rule, target, evaluate(engine, max_tokens=max_tokens, progress=False)))
    finally:
        engine.reconfigure(saved)
    return rows


def sweep_combined(engine, sparsities: Sequence[float], precisions: Sequence[str], attentions: Sequence[str],
                   max_tokens: int = 1024, rule: str = "topk", progress: bool = True) -> list[dict]:
    """Every combination of activation sparsity x weight format x attention selector, measured: one row
    each with the policy, its weight bytes, and quality against the unmodified model.

    >>> from workbench import Engine
    >>> rows = sweep_combined(Engine.from_pretrained("synthetic:tiny-llama"), [0, 0.5], ["none"], ["dense"], 64,
    ...                       progress=False)
    >>> [r["sparsity"] for r in rows]
    [0, 0.5]
    """

    saved = engine.policy
    rows = []
    try:
        for s, p, a in bar(list(product(sparsities, precisions, attentions)), desc="combined sweep",
                           unit="policy", enabled=progress):
            policy = Policy.uniform(s, rule if s else None, p, a)
            engine.reconfigure(policy)
            result = evaluate(engine, max_tokens=max_tokens, progress=False)
            stats = engine.stats()
            rows.append({"policy": policy.name, "sparsity": s, "precision": p, "attention": a,
                         "weight_mib": stats["weight_bytes"] / 2**20,
                         "bits_per_weight": 8 * stats["weight_bytes"] / stats["parameters"],
                         "kld_mean": result["kld_mean"], "top1": result["top1"],
                         "perplexity": result["perplexity"]})
    finally:
        engine.reconfigure(saved)
    return rows
