"""Where an elastic run's time goes when the controller switches rungs: `workbench loadtest` with timers
around the steps a policy change sets off (the reconfigure, the decode graph's capture, prefill graph
captures, kernel tuning, weight layouts), printed as a table at the end.

    python experiments/serving/switch_profile.py --out profile.json -- --model synthetic:llama-3-8b \\
        --requests 64 --prompt-tokens 128 --output-tokens 64 --max-num-seqs 32 --slo-ttft 1.0 \\
        --slo-tpot 0.05 --modes continuous,elastic --ladder dense,threshold50+int8 --seed 2
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections import defaultdict

import torch

TIMES: dict[str, list[float]] = defaultdict(list)


def timed(owner, name: str, label: str) -> None:
    """Replace owner.name by a wrapper that adds each call's wall time (device synced) to TIMES[label]."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        sync()
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sync()
            TIMES[label].append(time.perf_counter() - t0)
    setattr(owner, name, wrapper)


def sync() -> None:
    if torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing():
        torch.cuda.synchronize()


def install() -> None:
    from workbench.engine import Engine
    from workbench.kernels import quant_paths, tuning
    from workbench.runtime import graphs, runner
    timed(Engine, "reconfigure", "engine.reconfigure")
    timed(graphs.GraphedStep, "__init__", "decode graph capture (GraphedStep)")
    timed(graphs.GraphedPrefill, "_capture", "prefill graph capture (one bucket)")
    timed(runner.BatchRunner, "admit", "admission (BatchRunner.admit, all of it)")
    timed(runner.BatchRunner, "step", "decode step (BatchRunner.step)")
    timed(quant_paths.QuantPaths, "layout", "quantized weight layouts (QuantPaths.layout)")
    real = tuning._graph_time

    def graph_time(*args, **kwargs):  # only the tuner's timing runs: a cache hit costs nothing
        t0 = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            TIMES["tuner: one candidate timed"].append(time.perf_counter() - t0)
    tuning._graph_time = graph_time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    ap.add_argument("loadtest", nargs=argparse.REMAINDER, help="after --: the loadtest arguments")
    args = ap.parse_args()
    install()
    from workbench.cli import main as cli
    rest = args.loadtest[1:] if args.loadtest[:1] == ["--"] else args.loadtest
    t0 = time.perf_counter()
    rc = cli(["loadtest", *rest])
    total = time.perf_counter() - t0
    rows = {k: {"calls": len(v), "total_s": round(sum(v), 3), "max_s": round(max(v), 3)} for k, v in TIMES.items()}
    print(f"\n{'what':<48} {'calls':>6} {'total s':>9} {'max s':>8}   (the whole run: {total:.1f} s)")
    for k, r in sorted(rows.items(), key=lambda kv: -kv[1]["total_s"]):
        print(f"{k:<48} {r['calls']:>6} {r['total_s']:>9.3f} {r['max_s']:>8.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"argv": rest, "total_s": total, "timers": rows}, f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
