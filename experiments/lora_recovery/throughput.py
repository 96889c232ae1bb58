"""LoRA training throughput (tokens/s) by policy: the plain model (peft's own LoRA layer) against our
LoRA layer over sparse and quantized wrappers.

    python experiments/lora_recovery/throughput.py                                # default model, CPU
    python experiments/lora_recovery/throughput.py --model synthetic:smollm2-135m --device cuda \\
        --batch 16 --out experiments/lora_recovery/throughput_h200_b16.json     # the same shapes on a GPU

Random weights time like real ones (same shapes, same work), so the GPU run uses the synthetic model of the
default model's shape. Each policy: LoRA r=16 on every linear layer, KL loss (the recovery task's: two
forwards, one backward), `--warmup` untimed steps, then `--steps` timed ones.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from workbench import Engine, Policy
from workbench.environment import environment
from workbench.lora import attach_lora, train, unload
from workbench.lora_tasks import corpus_chunks

POLICIES = {"dense": Policy.identity(), "int4-g64": Policy.uniform(0.0, None, "int4-g64", name="int4-g64"),
            "topk50+int4-g64": Policy.uniform(0.5, "topk", "int4-g64", name="topk50+int4-g64")}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--loss", default="kl", choices=("kl", "lm"))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    engine = Engine.from_pretrained(args.model, device=args.device)
    # long chunks, cut at max_len: every example is exactly max_len tokens, whatever the tokenizer
    chunks = corpus_chunks("calibration", min_chars=8 * args.max_len, limit=64)
    rows = []
    for name in args.policies.split(","):
        engine.reconfigure(POLICIES[name])
        handle = attach_lora(engine, r=16, alpha=32, targets="all-linear")
        kw = dict(lr=1e-4, batch=args.batch, max_len=args.max_len, loss=args.loss, progress=False)
        train(engine, chunks, steps=args.warmup, **kw)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = train(engine, chunks, steps=args.steps, **kw)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        rows.append({"policy": name, "tokens_per_s": round(result.tokens / seconds, 1),
                     "ms_per_step": round(seconds / args.steps * 1e3, 1), "tokens_per_step": result.tokens // args.steps,
                     "trainable_params": handle.trainable})
        print(f"{name:>18}: {rows[-1]['tokens_per_s']:>8} tokens/s  ({rows[-1]['ms_per_step']} ms/step)", flush=True)
        unload(engine)
    result = {"model": args.model, "device": str(engine.device), "dtype": str(next(engine.model.parameters()).dtype),
              "settings": vars(args), "rows": rows, "environment": environment()}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
