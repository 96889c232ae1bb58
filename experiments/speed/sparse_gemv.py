"""Batch-1 GEMV of a Llama-3-8B MLP weight (14336 x 4096, bf16): dense cuBLAS against the sparse kernel.

    python experiments/speed/sparse_gemv.py [--out FILE]      # needs CUDA

Activation sparsity 0-70% (threshold at that quantile of |x|), median of 200 CUDA-graph replays, with the
copy-bandwidth bound of reading the whole weight once. Writes sparse_gemv.json.
"""
import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from workbench.kernels.sparse_gemv import sparse_gemv


def timed(fn, iters=200):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def copy_bandwidth(nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = timed(lambda: dst.copy_(src))
    return 2 * nbytes / us / 1e3  # GB/s: read + write


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).with_name("sparse_gemv.json")))
    args = ap.parse_args()
    torch.manual_seed(0)
    n, k = 14336, 4096
    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    wt = w.t().contiguous()
    x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
    acc = torch.zeros(n, device="cuda", dtype=torch.float32)
    dense_us = timed(lambda: F.linear(x[None], w))
    bw = copy_bandwidth(w.numel() * 2)
    bound_us = w.numel() * 2 / bw / 1e3
    rows = [{"kernel": "cuBLAS dense", "sparsity": 0.0, "us": dense_us, "speedup": 1.0}]
    # a small tile search at 50% sparsity, then the sweep with the best tile
    configs = [dict(block_k=bk, block_n=bn, num_warps=nw)
               for bk, bn, nw in [(64, 256, 4), (32, 256, 4), (64, 512, 8), (128, 128, 4), (32, 512, 4),
                                  (16, 1024, 8)]]
    t50 = torch.quantile(x.float().abs(), 0.5).item()
    tuned = {json.dumps(c): timed(lambda c=c: sparse_gemv(x, wt, t50, out=acc, **c)) for c in configs}
    best = json.loads(min(tuned, key=tuned.get))
    for s in (0.0, 0.25, 0.4, 0.5, 0.7, 0.9):
        t = torch.quantile(x.float().abs(), s).item() if s else 0.0
        us = timed(lambda: sparse_gemv(x, wt, t, out=acc, **best))
        rows.append({"kernel": "sparse_gemv", "sparsity": s, "us": us, "speedup": dense_us / us})
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": [n, k],
           "copy_gb_per_s": bw, "bound_us": bound_us, "tile_search_us_at_50pct": tuned, "tile": best, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
