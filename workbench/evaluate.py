"""Quality against the unmodified model: perplexity, KL divergence of next-token distributions, top-1.

The yardstick (as llama.cpp's KL-divergence tool uses it): on held-out text, for every scored position,
KL(p_reference || p_modified) of the next-token distributions, its mean and 99th percentile, and how often
both models put the same token on top. The reference is the same model with the policy bypassed.

Default corpus: the Python language reference that ships with CPython (`pydoc_data.topics`), split by
topic name into a calibration part and a held-out part with a stable hash, so every machine gets the same
split for the same Python version (recorded with every result, since the text varies a little between
versions).
"""
from __future__ import annotations

import math
import platform
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

from workbench.errors import InputError

HELDOUT_EVERY = 5  # one topic in five is held out
DEFAULT_SEQ_LEN = 512
DEFAULT_MAX_TOKENS = 4096


def pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics
    return dict(topics)


def corpus_split(part: str = "heldout") -> str:
    """The calibration or held-out part of the Python reference text (topics in sorted order).

    >>> "heldout" and len(corpus_split("heldout")) > 10_000
    True
    """
    topics = pydoc_topics()
    return "\n\n".join(topics[n].strip() for n in topic_names(part))


def topic_names(part: str) -> list[str]:
    """Sorted topic names of one part; a stable hash of the name decides, so the split never drifts."""
    if part not in ("heldout", "calibration"):
        raise InputError(f"corpus part must be 'heldout' or 'calibration', got {part!r}")
    return [n for n in sorted(pydoc_topics()) if (zlib.crc32(n.encode()) % HELDOUT_EVERY == 0) == (part == "heldout")]


def load_text(corpus: str | None = None, part: str = "heldout") -> tuple[str, str]:
    """(text, description): the default corpus part, or a UTF-8 text file."""
    if corpus in (None, "pydoc"):
        return corpus_split(part), f"pydoc_data.topics:{part} (Python {platform.python_version()})"
    path = Path(corpus).expanduser()
    if not path.is_file():
        raise InputError(f"corpus file not found: {corpus}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"corpus file is not UTF-8 text: {corpus}") from None
    if not text.strip():
        raise InputError(f"corpus file is empty: {corpus}")
    return text, str(path)


def token_windows(tokenizer, text: str, seq_len: int = DEFAULT_SEQ_LEN,
                  max_tokens: int = DEFAULT_MAX_TOKENS) -> list[torch.Tensor]:
    """Non-overlapping windows of token ids; each scores len-1 positions, max_tokens in all."""
    if seq_len < 2:
        raise InputError(f"seq_len must be at least 2, got {seq_len}")
    if max_tokens < 1:
        raise InputError(f"max_tokens must be a positive integer, got {max_tokens}")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    windows, scored = [], 0
    for start in range(0, len(ids) - 1, seq_len):
        window = ids[start:start + seq_len]
        take = min(len(window), max_tokens - scored + 1)
        if take < 2:
            break
        windows.append(window[:take])
        scored += take - 1
    if not windows:
        raise InputError("the evaluation text is too short: it needs at least 2 tokens")
    return windows


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
    from tqdm.auto import tqdm
    text, description = load_text(corpus, "heldout")
    windows = token_windows(engine.tokenizer, text, min(seq_len, engine.max_positions), max_tokens)
    parts: dict[str, list[torch.Tensor]] = {}
    engine.reset_stats()  # achieved sparsity is measured on this text alone
    t0 = time.perf_counter()
    for window in tqdm(windows, desc="evaluating", unit="window", disable=not progress):
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


def environment() -> dict:
    """Versions recorded with every result."""
    import transformers
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "machine": platform.machine()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env
