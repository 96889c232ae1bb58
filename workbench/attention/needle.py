"""Needle in a haystack: does a sparse-attention selector keep the one fact an answer needs?

A long document of the default corpus (its held-out split) gets one sentence with a random code placed at a
given depth; at the end a question asks for the code. The document and the question are prefilled with
dense attention (decode-time sparse attention, as Quest and DeepSeek-V3.2 at decode use it), then the
question's last token and the answer are decoded under each selector and budget, teacher-forced:

- `found`: every answer token is the model's greedy choice (the code comes out exactly);
- `logprob`: the mean log-probability of the answer tokens (dense sets the ceiling);
- `recall`: the share of the dense softmax mass the selection kept on those steps (the backend's measure).

One dense prefill per (length, depth, code); each selector then costs a few decode steps, the cache cropped
back to the document after each.
"""
from __future__ import annotations

import random
import time

import torch

from workbench.errors import InputError

BUDGETS = (64, 256, 1024)
SELECTORS = ("topk:{b}", "indexer:{b}", "block:{b}", "window:4+{b}", "hierarchical:32/128,{b}")
NEEDLE = "\nNote for the reader: the secret code of the archive is {code}.\n"
QUESTION = "\n\nQuestion: What is the secret code of the archive?\nAnswer: The secret code of the archive is"


def needle_policies(budgets=BUDGETS) -> list[str]:
    """dense, then every selector at every budget (window: 4 sinks + `budget` recent keys)."""
    return ["dense"] + [s.format(b=b) for s in SELECTORS for b in budgets]


def build_prompt(tokenizer, haystack_ids: list[int], length: int, depth: float, code: str):
    """(prefix ids, tail ids, answer ids) of a `length`-token prompt: prefix = the document with the needle at
    `depth` and the question but its last token; tail = that token and the answer but its last token."""
    needle = tokenizer(NEEDLE.format(code=code), add_special_tokens=False)["input_ids"]
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    answer = tokenizer(f" {code}.", add_special_tokens=False)["input_ids"]
    body = length - len(needle) - len(question) - len(answer)
    if body < 64:
        raise InputError(f"a {length}-token needle prompt leaves {body} document tokens beside the needle and the "
                         f"question; it needs at least 64")
    if len(haystack_ids) < body:
        raise InputError(f"a {length}-token needle prompt needs {body} document tokens, the corpus has "
                         f"{len(haystack_ids)}")
    at = int(depth * body)
    ids = haystack_ids[:at] + needle + haystack_ids[at:body] + question
    return ids[:-1], [ids[-1]] + answer[:-1], answer


def needle_probe(engine, lengths=(2048,), depths=(0.1, 0.5), codes: int = 3, budgets=BUDGETS, seed: int = 0,
                 progress=None) -> dict:
    """Every (length, depth, code, policy) point on `engine`'s model; the engine's policy is put back after."""
    from workbench import Policy
    from workbench.corpus import corpus_split
    from workbench.environment import environment
    limit = getattr(engine.model.config, "max_position_embeddings", None)
    if limit and max(lengths) > limit:
        raise InputError(f"a {max(lengths)}-token needle prompt exceeds the model's {limit} positions")
    if not all(0.0 <= d < 1.0 for d in depths):
        raise InputError(f"needle depths are shares of the document in [0, 1), got {list(depths)}")
    say = progress or (lambda msg: None)
    tok, model, before = engine.tokenizer, engine.model, engine.policy
    haystack = tok(corpus_split("heldout"), add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    secrets = [str(rng.randint(100000, 999999)) for _ in range(codes)]
    policies, points, t0 = needle_policies(budgets), [], time.time()
    try:
        for length in lengths:
            for depth in depths:
                for code in secrets:
                    prefix, tail, answer = build_prompt(tok, haystack, length, depth, code)
                    engine.reconfigure(Policy.identity())
                    with torch.inference_mode():
                        cache = model(torch.tensor([prefix]), use_cache=True).cache  # dense prefill
                    for name in policies:
                        engine.reconfigure(Policy.parse(name))
                        engine.reset_stats()
                        with torch.inference_mode():
                            logits = model(torch.tensor([tail]), cache=cache, use_cache=True).logits[0]
                        cache.crop(-len(tail))  # back to the prefilled document for the next policy
                        want = torch.tensor(answer)
                        logp = torch.log_softmax(logits.float(), dim=-1).gather(1, want[:, None])
                        recall = engine.stats().get("attention_recall") or {}
                        points.append({"length": length, "depth": depth, "code": code, "policy": name,
                                       "found": bool((logits.argmax(-1) == want).all()),
                                       "logprob": float(logp.mean()), "recall": recall.get("overall")})
                    dense = points[-len(policies)]
                    say(f"[{time.time() - t0:5.0f} s] {length} tokens, depth {depth}, code {code}: dense "
                        f"{'found it' if dense['found'] else 'missed it'}")
    finally:
        engine.reconfigure(before)
    return {"points": points, "lengths": list(lengths), "depths": list(depths), "codes": secrets,
            "budgets": list(budgets), "selectors": list(SELECTORS), "needle": NEEDLE, "question": QUESTION,
            "environment": environment(engine.device), "seconds": round(time.time() - t0, 1)}


def needle_summary(result: dict) -> list[dict]:
    """Per (length, policy): points, codes found, their share, and the answer's mean log-probability."""
    rows: dict[tuple, dict] = {}
    for p in result["points"]:
        r = rows.setdefault((p["length"], p["policy"]), {"length": p["length"], "policy": p["policy"], "n": 0,
                                                          "found": 0, "logprob": 0.0})
        r["n"] += 1
        r["found"] += p["found"]
        r["logprob"] += p["logprob"]
    for r in rows.values():
        r["found_rate"] = r["found"] / r["n"]
        r["logprob"] /= r["n"]
    return list(rows.values())
