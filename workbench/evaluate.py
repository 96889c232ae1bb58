"""Quality against the unmodified model: perplexity, KL divergence of next-token distributions, top-1.

The yardstick (as llama.cpp's KL-divergence tool uses it): on held-out text, for every scored position,
KL(p_reference || p_modified) of the next-token distributions, its mean and 99th percentile, and how often
both models put the same token on top. The reference is the same model with the policy bypassed. The text
and its windows come from `workbench.corpus` (BOS first where the model uses one; never scored).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from workbench.corpus import DEFAULT_MAX_TOKENS, DEFAULT_SEQ_LEN, load_text, token_windows
from workbench.environment import environment

def compare_logits(ref: torch.Tensor, mod: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position metrics for logits (N, V) and next tokens (N,): KL(ref||mod), NLLs, top-1 agreement."""
    ref_lp = F.log_softmax(ref.float(), dim=-1)
    mod_lp = F.log_softmax(mod.float(), dim=-1)
    kld = (ref_lp.exp() * (ref_lp - mod_lp)).sum(-1)
    return {
        "kld": kld,
        "nll": -mod_lp.gather(-1, targets[:, None])[:, 0],
        "ref_nll": -ref_lp.gather(-1, targets[:, None])[:, 0],
        "same_top1": (ref_lp.argmax(-1) == mod_lp.argmax(-1)).float(),
    }


def evaluate(engine, corpus: str | None = None, seq_len: int = DEFAULT_SEQ_LEN,
             max_tokens: int = DEFAULT_MAX_TOKENS, progress: bool = True) -> dict:
    """Score the engine's current policy against its unmodified model on held-out text.

    >>> from workbench import Engine
    >>> r = evaluate(Engine.from_pretrained("synthetic:tiny-llama"), max_tokens=64, progress=False)
    >>> r["kld_mean"], r["top1"]
    (0.0, 1.0)
    """
    from workbench.progress import progress as bar
    text, description = load_text(corpus, "heldout")
    windows = token_windows(engine.tokenizer, text, min(seq_len, engine.max_positions), max_tokens)
    parts: dict[str, list[torch.Tensor]] = {}
    engine.reset_stats()  # achieved sparsity is measured on this text alone
    t0 = time.perf_counter()
    for window in bar(windows, desc="evaluating", unit="window", enabled=progress):
        ids = window[None].to(engine.device)  # (1, T)
        ref = engine.reference_logits(ids)[0, :-1]
        mod = engine.forward(ids)[0, :-1]
        for key, value in compare_logits(ref, mod, ids[0, 1:]).items():
            parts.setdefault(key, []).append(value.cpu())
    m = {k: torch.cat(v).double() for k, v in parts.items()}
    stats = engine.stats()
    return {
        "model": engine.name,
        "policy": engine.policy.name,
        "perplexity": math.exp(m["nll"].mean().item()),
        "reference_perplexity": math.exp(m["ref_nll"].mean().item()),
        "kld_mean": m["kld"].mean().item(),
        "kld_p99": torch.quantile(m["kld"], 0.99).item(),
        "top1": m["same_top1"].mean().item(),
        "tokens": int(m["kld"].numel()),
        "windows": len(windows),
        "seq_len": seq_len,
        "corpus": description,
        "achieved_sparsity": stats["achieved_sparsity"],
        "attention_recall": (stats["attention_recall"] or {}).get("overall"),
        "weight_bytes": stats["weight_bytes"],
        "weight_bytes_by_format": stats["weight_bytes_by_format"],
        "reference_bytes": stats["reference_bytes"],
        "seconds": round(time.perf_counter() - t0, 2),
        **environment(),
    }
