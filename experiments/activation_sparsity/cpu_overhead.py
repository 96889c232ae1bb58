"""Does the masked (reference) sparsity path slow the CPU down? Forward time per rule vs dense.

    python experiments/activation_sparsity/cpu_overhead.py [--model default] [--repeats 20]

Times one decode-shaped forward (batch 1, 1 new token over a 128-token prompt's worth of positions is
not needed: the linear layers dominate, so a 1-token forward is timed) and one 128-token forward, median
of --repeats, for dense and each rule at 0.25/0.5. Writes cpu_overhead.json beside this file.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from workbench import Engine, Policy
from workbench.corpus import corpus_split, token_windows
from workbench.environment import environment


def median_ms(engine, ids, repeats):
    engine.forward(ids)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.forward(ids)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    engine = Engine.from_pretrained(args.model, device="cpu")
    ids = token_windows(engine.tokenizer, corpus_split("heldout"), 128, 128)[0][None]
    shapes = {"1_token": ids[:, :1], "128_tokens": ids}
    rows = []
    for rule, target in [("dense", 0.0), ("topk", 0.25), ("topk", 0.5), ("threshold", 0.25), ("threshold", 0.5),
                         ("weighted", 0.5)]:
        engine.reconfigure(Policy.uniform(sparsity=target, rule=rule))
        row = {"rule": rule, "target": target}
        for name, x in shapes.items():
            row[f"{name}_ms"] = round(median_ms(engine, x, args.repeats), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    dense = rows[0]
    for row in rows:
        for name in shapes:
            row[f"{name}_overhead"] = round(row[f"{name}_ms"] / dense[f"{name}_ms"] - 1, 4)
    out = {"model": args.model, "threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows,
           **environment()}
    path = Path(__file__).with_name("cpu_overhead.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
