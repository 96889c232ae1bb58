"""What one prefill pass costs, eager against replayed from a CUDA graph (`GraphedPrefill`), per batch of
prompts: the host-bound regime that made prefill, not decoding, set the pace of serving on the GPU.

    python experiments/serving/prefill_timing.py --model synthetic:llama-3-8b --out experiments/serving/prefill_h200.json

Each row: median wall milliseconds of a prefill (prompts in, last logits read back) over `--reps`
runs, eager and graphed, and the graph replay's own GPU time (CUDA events around the replay alone).
"""
import argparse
import json
import time

import torch

from workbench import Engine
from workbench.runtime import Decoder, SlotKVCache
from workbench.runtime.graphs import GraphedPrefill
from workbench.environment import environment

SHAPES = [(1, 64), (1, 128), (2, 128), (4, 128), (10, 192), (16, 128)]


def median_ms(fn, cache, prompts, reps: int) -> float:
    times = []
    for _ in range(reps + 1):  # the first run is a warm-up (and captures a graph)
        slots = [cache.acquire() for _ in prompts]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(cache, slots, prompts).argmax(-1).tolist()
        times.append((time.perf_counter() - t0) * 1e3)
        for slot in slots:
            cache.release(slot)
    return sorted(times[1:])[reps // 2]


def replay_gpu_ms(graphed: GraphedPrefill, key, reps: int) -> float:
    graph = graphed.graphs[key][0]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="synthetic:llama-3-8b")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
    engine = Engine.from_pretrained(args.model, device="cuda", dtype=torch.bfloat16)
    decoder = Decoder(engine.model)
    cache = SlotKVCache.for_model(engine.model, 32, 512)
    graphed = GraphedPrefill(decoder, cache, max_tokens=10 ** 9)  # time every bucket, even the eager ones
    rows = []
    with torch.inference_mode(), engine.dense_prefill():
        for batch, tokens in SHAPES:
            prompts = [torch.randint(0, 1000, (tokens,), device="cuda") for _ in range(batch)]
            row = {"batch": batch, "tokens": tokens, "bucket": list(graphed.bucket(batch, tokens)),
                   "eager_ms": median_ms(decoder.prefill_batch, cache, prompts, args.reps),
                   "graphed_ms": median_ms(graphed, cache, prompts, args.reps)}
            row["replay_gpu_ms"] = replay_gpu_ms(graphed, graphed.bucket(batch, tokens), args.reps)
            print(f"{batch:>3} x {tokens:<4} eager {row['eager_ms']:6.1f} ms  graphed {row['graphed_ms']:6.1f} ms  "
                  f"(replay alone on the GPU {row['replay_gpu_ms']:5.1f} ms, bucket {row['bucket']})", flush=True)
            rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "rows": rows, "environment": environment()}, f, indent=1)


if __name__ == "__main__":
    main()
