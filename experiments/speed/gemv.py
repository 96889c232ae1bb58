"""One Llama-3-8B weight at batch 1 (and 8), every GEMV path: cuBLAS bf16, our int8 / int4 kernels, aten's
tinygemm int4 (a peer), and the sparse kernel (bf16 and fused int8) across sparsities.

    python experiments/speed/gemv.py [--out FILE]      # needs CUDA; writes gemv.json

Median of 200 CUDA-graph replays per path, launch configs as the engine's tuner picks them, against the
copy-bandwidth bound of reading the bytes each path must read.
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from workbench.kernels.quant_gemv import quant_gemv
from workbench.kernels.sparse_gemv import gather_gemv, sparse_gemv
from workbench.kernels.topk import topk_select, topk_threshold
from workbench.kernels.tuning import graph_replay_ms
from workbench.formats import quant


def timed(fn, iters=200):
    """Median microseconds of a CUDA-graph replay of fn."""
    return graph_replay_ms(fn, iters) * 1e3


def copy_bandwidth(nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src)) / 1e3  # GB/s, read + write


def tinygemm(w: torch.Tensor, group: int):
    """aten's int4 kernel on the same asymmetric int4 weights (its own packing: even k in the high nibble)."""
    t = quant.quantize_int4(w.float(), group, symmetric=False)
    q = quant.unpack_int4(t["q"]).int()
    packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
    sz = quant.int4_scale_and_zero(t).to(torch.bfloat16)
    return lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, group, sz), t["q"].numel() + 2 * sz.numel()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).with_name("gemv.json")))
    args = ap.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth(1 << 30)
    rows = []
    for n, k in ((14336, 4096), (4096, 14336)):
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            def add(path, fn, nbytes, sparsity=0.0):
                us = timed(fn)
                rows.append(dict(shape=[n, k], tokens=m, path=path, sparsity=sparsity, us=us,
                                 bound_us=nbytes / bw / 1e3))
                print(f"{n}x{k} m={m} {path:>22} s={sparsity:.2f}: {us:7.1f} us (bound {nbytes / bw / 1e3:6.1f})",
                      flush=True)
            add("cuBLAS bf16", lambda: F.linear(x, w), w.numel() * 2)
            i8 = quant.quantize_int8_channel(w.float())
            add("quant_gemv int8", lambda: quant_gemv(x, i8), n * k + 4 * n)
            for g in (32, 64, 128):
                i4 = quant.quantize_int4(w.float(), g)
                add(f"quant_gemv int4-g{g}", lambda i4=i4: quant_gemv(x, i4), n * k // 2 + 2 * n * k // g)
            try:
                fn, nbytes = tinygemm(w, 64)
                add("aten tinygemm int4-g64", lambda: fn(x), nbytes)
            except RuntimeError as e:
                print("tinygemm unavailable:", str(e).splitlines()[0])
            wt, qt = w.t().contiguous(), i8["q"].t().contiguous()
            s8 = quant.quantize_int8_channel(w.float())["scale"].to(torch.bfloat16)
            if m == 1:  # measured once: 280-550 us on an H100, so it is no candidate in the engine
                add("aten int8pack", lambda: torch.ops.aten._weight_int8pack_mm(x, i8["q"], s8), n * k + 2 * n)
            for s in (0.0, 0.25, 0.4, 0.5, 0.7, 0.9):
                keep = k - round(s * k)
                cut = topk_threshold(x, keep)
                if m == 1:  # the decode path at batch 1: walk only the kept rows
                    sel = topk_select(x, keep)
                    add("gather_gemv bf16", lambda: gather_gemv(x, sel.idx, sel.count, keep, wt), keep * n * 2, s)
                    add("gather_gemv int8", lambda: gather_gemv(x, sel.idx, sel.count, keep, qt, i8["scale"]),
                        keep * n + 4 * n, s)
                frac = 1 - (1 - s) ** 1 if m == 1 else 1 - ((x.abs() > cut[:, None]).any(0).float().mean().item())
                add("sparse_gemv bf16", lambda: sparse_gemv(x, cut, wt), (1 - frac) * n * k * 2, s)
                add("sparse_gemv int8", lambda: sparse_gemv(x, cut, qt, i8["scale"]), (1 - frac) * n * k + 4 * n, s)
            for bits in (2, 4, 8, 11):
                add(f"topk_select {bits}-bit", lambda bits=bits: topk_select(x, k // 2, bits), x.numel() * 2)
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_gb_per_s": bw, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
