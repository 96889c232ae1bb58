"""Low-bit GEMV/GEMM per kernel at Llama-3-8B shapes and 1-64 tokens, in one run: int4-g64 (cuBLAS bf16,
aten's tinygemm, our Triton `gemv_int4` at its best of a few configs, our CUDA C++ `gemv_int4_mma` at every
config) or int8 with row scales (cuBLAS bf16, our Triton `gemv_int8`, our CUDA C++ `gemv_int8_mma`).

    python experiments/speed/kernels/bench_mma.py --out $OUT/w4_mma.json [--format int8] [--tokens 1,8,32]

Each variant runs in one CUDA graph over R copies of its weight (R x bytes > 3x L2, so weights come from
HBM, as in a decode step where 16 GB of weights pass through a 60 MB L2); the median of 30 replays / R.
Every output is checked against the float64 reference (rel. error < 1e-2) before it is timed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch  # noqa: E402

from workbench.formats.quant import quantize_int4, quantize_int8_channel  # noqa: E402
from workbench.kernels import gemv_bf16_mma, gemv_int4, gemv_int4_mma, gemv_int8, gemv_int8_mma  # noqa: E402
from workbench.kernels.peers import tinygemm, tinygemm_pack  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}


def graph_us(fns, replays=30):
    """Median microseconds per call of the callables in `fns`, all run once per graph replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for f in fns:
                f()
        graph.replay()
        times = []
        for _ in range(replays):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(stream)
            graph.replay()
            b.record(stream)
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3 / len(fns))
    torch.cuda.current_stream().wait_stream(stream)
    return statistics.median(times)


def copies(nbytes, l2):
    return max(2, -(-3 * l2 // nbytes))


def rel(got, want):
    return ((got.float() - want).norm() / want.norm()).item()


def timer(rows, name, n, k, m, line):
    def add(variant, fns, nbytes, err, config=None):
        us = graph_us(fns)
        rows.append(dict(shape=name, n=n, k=k, m=m, variant=variant, us=us, gb_per_s=nbytes / us / 1e3,
                         rel_err=err, config=config))
        line[variant] = us
    return add


def int4_shape(name, tokens, l2, rows, failed):
    n, k = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    t = quantize_int4(w, 64)
    wb = w.to(torch.bfloat16)
    del w
    int4_bytes = n * k // 2 + 2 * n * (k // 64)
    r4, r16 = copies(int4_bytes, l2), copies(2 * n * k, l2)
    mma = [gemv_int4_mma.pack(t) for _ in range(r4)]  # pack makes a new tensor each time
    tiny = [tinygemm_pack(t)] + [tinygemm_pack({kk: v.clone() for kk, v in t.items()}) for _ in range(r4 - 1)]
    tri = [gemv_int4.pack({kk: v.clone() for kk, v in t.items()}) for _ in range(r4)]
    dense = [wb] + [wb.clone() for _ in range(r16 - 1)]
    for m in tokens:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        want = gemv_int4.reference(x, t)
        line = {}
        add = timer(rows, name, n, k, m, line)
        add("cuBLAS bf16", [lambda d=d: x @ d.T for d in dense], 2 * n * k, rel(x @ wb.T, want))
        add("tinygemm", [lambda p=p: tinygemm(x, p) for p in tiny], int4_bytes, rel(tinygemm(x, tiny[0]), want))
        best = None
        cands = gemv_int4.candidates(m, n, k, 64, x.device)  # the default, and the two best kinds' first
        for cfg in [cands[0]] + [c for c in cands if c.get("wa")][:2] + [c for c in cands if c.get("cc")][:2]:
            try:
                us = graph_us([lambda p=p: gemv_int4.launch(x, p, cfg) for p in tri[:2]], replays=5)
            except Exception as e:  # noqa: BLE001 - a config that does not launch here is no candidate
                failed.append(f"triton {cfg}: {type(e).__name__}")
                continue
            if best is None or us < best[0]:
                best = (us, cfg)
        cfg = best[1]
        add("ours triton", [lambda p=p: gemv_int4.launch(x, p, cfg) for p in tri], int4_bytes,
            rel(gemv_int4.launch(x, tri[0], cfg), want), cfg)
        for cfg in gemv_int4_mma.candidates(m, n, k, 64):
            try:
                err = rel(gemv_int4_mma.launch(x, mma[0], cfg), want)
            except Exception as e:  # noqa: BLE001 - reported in the results, the run goes on
                failed.append(f"w4_mma {name} m={m} {cfg}: {type(e).__name__}: {e}")
                continue
            if not err < 1e-2:
                failed.append(f"w4_mma {name} m={m} {cfg}: rel err {err:.2e}")
                continue
            add(f"ours cuda {cfg['warps']}w{cfg['ahead']}a{cfg.get('rows', 1)}r", [lambda p=p, c=cfg: gemv_int4_mma.launch(x, p, c)
                                                              for p in mma], int4_bytes, err, cfg)
        print(f"{name:8s} m={m:2d} " + "  ".join(f"{v}={us:.1f}" for v, us in line.items()), flush=True)
    del mma, tiny, tri, dense
    torch.cuda.empty_cache()


def int8_shape(name, tokens, l2, rows, failed):
    n, k = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    t = quantize_int8_channel(w)
    wb = w.to(torch.bfloat16)
    del w
    r8, r16 = copies(n * k, l2), copies(2 * n * k, l2)
    mma = [gemv_int8_mma.pack(t) for _ in range(r8)]
    tri = [gemv_int8.pack({kk: v.clone() for kk, v in t.items()}) for _ in range(r8)]
    dense = [wb] + [wb.clone() for _ in range(r16 - 1)]
    for m in tokens:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        want = gemv_int8.reference(x, t)
        line = {}
        add = timer(rows, name, n, k, m, line)
        add("cuBLAS bf16", [lambda d=d: x @ d.T for d in dense], 2 * n * k, rel(x @ wb.T, want))
        best = None
        for cfg in gemv_int8.candidates(m, n, k, x.device)[:6]:
            try:
                us = graph_us([lambda p=p: gemv_int8.launch(x, p, cfg) for p in tri[:2]], replays=5)
            except Exception as e:  # noqa: BLE001 - a config that does not launch here is no candidate
                failed.append(f"triton {cfg}: {type(e).__name__}")
                continue
            if best is None or us < best[0]:
                best = (us, cfg)
        cfg = best[1]
        add("ours triton", [lambda p=p: gemv_int8.launch(x, p, cfg) for p in tri], n * k,
            rel(gemv_int8.launch(x, tri[0], cfg), want), cfg)
        for cfg in gemv_int8_mma.candidates(m, n, k):
            try:
                err = rel(gemv_int8_mma.launch(x, mma[0], cfg), want)
            except Exception as e:  # noqa: BLE001 - reported in the results, the run goes on
                failed.append(f"w8_mma {name} m={m} {cfg}: {type(e).__name__}: {e}")
                continue
            if not err < 1e-2:
                failed.append(f"w8_mma {name} m={m} {cfg}: rel err {err:.2e}")
                continue
            add(f"ours cuda {cfg['warps']}w{cfg['ahead']}a{cfg.get('rows', 1)}r", [lambda p=p, c=cfg: gemv_int8_mma.launch(x, p, c)
                                                              for p in mma], n * k, err, cfg)
        print(f"{name:8s} m={m:2d} " + "  ".join(f"{v}={us:.1f}" for v, us in line.items()), flush=True)
    del mma, tri, dense
    torch.cuda.empty_cache()


def bf16_shape(name, tokens, l2, rows, failed):
    """cuBLAS against our CUDA C++ kernel on the same stored weights."""
    n, k = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    wb = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    dense = [wb] + [wb.clone() for _ in range(copies(2 * n * k, l2) - 1)]
    for m in tokens:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        want = x.double() @ wb.double().T
        line = {}
        add = timer(rows, name, n, k, m, line)
        add("cuBLAS bf16", [lambda d=d: x @ d.T for d in dense], 2 * n * k, rel(x @ wb.T, want.float()))
        for cfg in gemv_bf16_mma.candidates(m, n, k):
            try:
                err = rel(gemv_bf16_mma.launch(x, wb, cfg), want.float())
            except Exception as e:  # noqa: BLE001 - reported in the results, the run goes on
                failed.append(f"w16_mma {name} m={m} {cfg}: {type(e).__name__}: {e}")
                continue
            if not err < 1e-2:
                failed.append(f"w16_mma {name} m={m} {cfg}: rel err {err:.2e}")
                continue
            add(f"ours cuda {cfg['warps']}w{cfg['ahead']}a{cfg.get('rows', 1)}r", [lambda d=d, c=cfg: gemv_bf16_mma.launch(x, d, c)
                                                              for d in dense], 2 * n * k, err, cfg)
        print(f"{name:8s} m={m:2d} " + "  ".join(f"{v}={us:.1f}" for v, us in line.items()), flush=True)
    del dense
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", default="1,8,16,32,64")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--format", choices=("int4", "int8", "bf16"), default="int4")
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    props = torch.cuda.get_device_properties(0)
    l2 = props.L2_cache_size
    rows, failed = [], []
    env = {"gpu": props.name, "torch": torch.__version__, "l2_bytes": l2, "pdl": os.environ.get("WORKBENCH_PDL", "1")}
    run = {"int4": int4_shape, "int8": int8_shape, "bf16": bf16_shape}[args.format]
    for name in args.shapes.split(","):
        run(name, tokens, l2, rows, failed)
    Path(args.out).write_text(json.dumps({"env": env, "rows": rows, "failed": failed}, indent=1))
    print("failed:", failed[:10])


if __name__ == "__main__":
    main()
