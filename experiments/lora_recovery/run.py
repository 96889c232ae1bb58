"""Recover what compression cost with LoRA: held-out KLD / top-1 before, after training, and after merging.

    python experiments/lora_recovery/run.py                 # the table in README.md (about 35 min, 2 cores)
    python experiments/lora_recovery/run.py --steps 10 --policies threshold50+int4-g64 --losses kl  # a look

For each policy: load the default model under it, score it on the held-out corpus (KLD and top-1 against
the unmodified model, perplexity), attach LoRA to every linear layer, train on text chunks of the
calibration corpus with the chosen loss ("kl": toward the unmodified model's distribution; "lm": plain
next-token loss), score again, merge (dequantize, add, requantize) and score the merged model.
Writes results.json next to this file (with the environment) and recovery.html/.png.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from workbench import Engine, Policy
from workbench.environment import environment
from workbench.evaluate import evaluate
from workbench.lora import attach_lora, merge, train
from workbench.lora_tasks import corpus_chunks
from workbench.viz import recovery_figure, save_figure

HERE = Path(__file__).parent
POLICIES = {
    "threshold50+int4-g64": Policy.uniform(0.5, "threshold", "int4-g64", name="threshold50+int4-g64"),
    "int4-g64": Policy.uniform(0.0, None, "int4-g64", name="int4-g64"),
    "threshold50": Policy.uniform(0.5, "threshold", "none", name="threshold50"),
}
SCORE_KEYS = ("kld_mean", "kld_p99", "top1", "perplexity")


def score(engine, max_tokens):
    r = evaluate(engine, max_tokens=max_tokens, progress=False)
    return {k: r[k] for k in SCORE_KEYS} | {"reference_perplexity": r["reference_perplexity"], "tokens": r["tokens"]}


def run_one(name, loss, args, chunks):
    torch.manual_seed(0)
    engine = Engine.from_pretrained("default", policy=POLICIES[name], device="cpu")
    before = score(engine, args.eval_tokens)
    handle = attach_lora(engine, r=args.rank, alpha=2 * args.rank, targets="all-linear")
    t0 = time.perf_counter()
    result = train(engine, chunks, steps=args.steps, lr=args.lr, batch=args.batch, max_len=args.max_len, loss=loss,
                   progress=True)
    after = score(engine, args.eval_tokens)
    report = merge(engine)
    merged = score(engine, args.eval_tokens)
    row = {"policy": name, "loss": loss, "before": before, "after": after, "merged": merged,
           "recovered": 1 - after["kld_mean"] / before["kld_mean"],
           "recovered_merged": 1 - merged["kld_mean"] / before["kld_mean"],
           "merge_sqnr_db_min": min((r["sqnr_db"] for r in report.values()), default=None),
           "trainable_params": handle.trainable, "train_tokens": result.tokens,
           "train_tokens_per_s": round(result.tokens_per_s, 1), "train_seconds": round(time.perf_counter() - t0, 1),
           "losses": [round(x, 5) for x in result.losses]}
    print(f"{name} / {loss}: KLD {before['kld_mean']:.4f} -> {after['kld_mean']:.4f} (merged {merged['kld_mean']:.4f}),"
          f" recovered {row['recovered']:.0%}; top-1 {before['top1']:.3f} -> {after['top1']:.3f};"
          f" {row['train_tokens_per_s']} tok/s", flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--losses", default="kl,lm", help="losses for the first policy; the others train with kl")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--out", default=str(HERE / "results.json"))
    args = p.parse_args()
    policies = args.policies.split(",")
    chunks = corpus_chunks("calibration")
    runs = [(policies[0], loss) for loss in args.losses.split(",")] + [(name, "kl") for name in policies[1:]]
    rows = [run_one(name, loss, args, chunks) for name, loss in runs]
    result = {"model": "default", "rows": rows, "settings": vars(args) | {"targets": "all-linear", "chunks": len(chunks)},
              "environment": environment()}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    figure = Path(args.out).with_name(Path(args.out).stem.replace("results", "recovery"))  # results_X -> recovery_X
    print("wrote", args.out, *save_figure(recovery_figure(result), figure, html=figure.name == "recovery"))


if __name__ == "__main__":
    main()
