"""Every launch config of the one-token sparse GEMV (`gemv_sparse`: gather / gather_db / gather_dot / fma /
dot) at the Llama-3-8B projection shapes and 50% activation sparsity, bf16 and fused int8, against cuBLAS
bf16 and our dense int8 GEMV in the same run; plus the older index-given `gather_gemv` (list made outside the
timing) as the bound of a kernel that gets its kept list for free.

    PYTHONUNBUFFERED=1 python3 experiments/speed/kernels/sparse_sweep.py --out $OUT/sparse_sweep.json [--candidates-only]
    python3 experiments/speed/kernels/sparse_sweep.py --dry          # CPU, Triton interpreter, tiny shapes

Each variant runs in one CUDA graph over R copies of its weight (R x bytes > 3x L2: the weight comes from
HBM) and the median replay / R is reported; kept GB/s counts the kept rows' bytes only. Every config's
output is checked against `gemv_sparse.reference` first (rel. error < 1e-2) and a failing one is reported,
not timed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gemv import copy_gbps, graph_us as _graph_us, rel_err  # noqa: E402


def graph_us(dry, fns, iters):
    return _graph_us(fns, iters, dry=dry)

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
EXTRA_BF16 = [("gather_dot", bn, bk, 4, st, slab) for bn in (128, 256) for bk in (32, 64) for st in (4, 6)
              for slab in (1024, 2048, 4096)] + \
             [("gather_dot", 128, 16, 4, 6, slab) for slab in (1024, 2048)] + \
             [("gather_dot", 256, 64, 8, 4, slab) for slab in (2048, 4096)]
EXTRA_INT8 = [("gather_db", bn, bk, w, 1, slab) for bn in (256, 512) for bk in (32, 64) for w in (4, 8)
              for slab in (1024, 2048)] + [("gather", 256, bk, 4, 1, 1024) for bk in (32, 64)]


def extra(int8: bool, dry: bool):
    out = EXTRA_INT8 if int8 else EXTRA_BF16
    return out[:2] if dry else out  # the interpreter is slow


def configs(n, k, int8, device, dry, more=True):
    from workbench.kernels import gemv_sparse
    out = gemv_sparse.candidates(1, n, k, int8, device)
    for kind, bn, bk, w, st, slab in (extra(int8, dry) if more else []):
        c = dict(kind=kind, block_n=bn, block_k=bk, warps=w, stages=st, slab=slab, split=0)
        if c not in out:
            out.append(c)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="sparse_sweep.json")
    ap.add_argument("--dry", action="store_true")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--candidates-only", action="store_true", help="the tuner's candidates, not the extra configs")
    args = ap.parse_args()
    import torch
    import torch.nn.functional as F
    from workbench.formats.quant import quantize_int8_channel
    from workbench.kernels import gemv_int8, gemv_sparse
    from workbench.kernels.sparse_gemv import gather_gemv
    dev = "cpu" if args.dry else "cuda"
    dtype = torch.float16 if args.dry else torch.bfloat16
    torch.manual_seed(0)
    if args.dry:
        bw = copy_gbps(True)
    else:  # the bench's measurement (best of timed copies): the graphed uint8 copy under-reads on the H200
        from workbench.bench import copy_bandwidth
        bw = copy_bandwidth(torch.device("cuda")) / 1e9
    l2 = 1 if args.dry else torch.cuda.get_device_properties(0).L2_cache_size
    env = dict(torch=torch.__version__, gpu=None if args.dry else torch.cuda.get_device_name(),
               copy_gb_per_s=bw)
    print(env, flush=True)
    rows = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        if args.dry:
            n, k = n // 64, k // 64
        w = (torch.randn(n, k, device=dev) * 0.02).to(dtype)
        x = torch.randn(1, k, device=dev).to(dtype)
        t = x.float().abs().median().reshape(1).contiguous()  # 50% kept
        kept = int((x.float().abs() > t).sum())
        for int8 in (False, True):
            packed = gemv_sparse.pack_int8(quantize_int8_channel(w.float())) if int8 else gemv_sparse.pack(w)
            wbytes = packed["wt"].numel() * packed["wt"].element_size()
            kept_bytes = wbytes * kept / k
            reps = 1 if args.dry else max(1, math.ceil(3 * l2 / wbytes))
            copies = [packed] + [{key: v.clone() for key, v in packed.items()} for _ in range(reps - 1)]
            ref = gemv_sparse.reference(x, t, packed)
            iters = 3 if args.dry else 50

            def add(variant, us, extra=None, err=None):
                row = dict(shape=name, n=n, k=k, int8=int8, variant=variant, us=us, err=err,
                           kept_gb_per_s=None if us is None else kept_bytes / us / 1e3, **(extra or {}))
                rows.append(row)
                print(f"{name:8s} {'int8' if int8 else 'bf16'} {variant:60s} "
                      + ("failed " + str(err) if us is None else f"{us:8.2f} us {row['kept_gb_per_s']:7.0f} GB/s"),
                      flush=True)

            # the dense peers: cuBLAS bf16 (and our int8 GEMV) over all bytes
            if not int8:
                dense = [w] + [w.clone() for _ in range(max(1, math.ceil(3 * l2 / (w.numel() * 2))) - 1)]
                add("cuBLAS bf16 (dense)", graph_us(args.dry, [lambda d=d: F.linear(x, d) for d in dense], iters))
            else:
                q8 = quantize_int8_channel(w.float())
                p8 = gemv_int8.pack(q8)
                p8s = [p8] + [{key: v.clone() for key, v in p8.items()} for _ in range(reps - 1)]
                add("ours int8 GEMV (dense)", graph_us(args.dry, [lambda p=p: gemv_int8.gemv(x, p) for p in p8s], iters))
            # the index-given gather (the list costs nothing here)
            idx = torch.nonzero(x[0].float().abs() > t[0]).flatten().to(torch.int32)
            cnt = torch.tensor([idx.numel()], device=dev, dtype=torch.int32)
            idx = torch.cat([idx, torch.zeros(k - idx.numel(), dtype=torch.int32, device=dev)])
            for c in copies[:1]:
                gather_gemv(x, idx, cnt, k, c["wt"], c.get("scale"))  # tunes
            add("gather_gemv, index list given", graph_us(
                args.dry, [lambda c=c: gather_gemv(x, idx, cnt, k, c["wt"], c.get("scale")) for c in copies], iters))
            for cfg in configs(n, k, int8, dev, args.dry, not args.candidates_only):
                label = ",".join(f"{a}={b}" for a, b in cfg.items())
                try:
                    y = torch.full((1, n), float("nan"), device=dev, dtype=dtype)
                    gemv_sparse.launch(x, t, packed, cfg, y=y)
                    err = rel_err(y, ref)
                except Exception as exc:  # a config that does not compile or launch: reported
                    add(label, None, cfg, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                    continue
                if not err < 1e-2:
                    add(label, None, cfg, f"rel. error {err:.2e}")
                    continue
                add(label, graph_us(args.dry, [lambda c=c: gemv_sparse.launch(x, t, c, cfg) for c in copies], iters), cfg, err)
            del copies
        Path(args.out).write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    # the best of each kind per shape
    print("\nbest per shape and kind (kept GB/s; % of copy bandwidth)")
    best = {}
    for r in rows:
        if r["us"] is None:
            continue
        kind = r.get("kind", r["variant"])
        key = (r["shape"], r["int8"], kind)
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    for (shape, int8, kind), r in sorted(best.items()):
        print(f"{shape:8s} {'int8' if int8 else 'bf16'} {kind:34s} {r['us']:8.2f} us {r['kept_gb_per_s']:6.0f} GB/s "
              f"{100 * r['kept_gb_per_s'] / bw:5.1f}%  {r['variant'] if 'kind' in r else ''}")
    Path(args.out).write_text(json.dumps(dict(env=env, rows=rows), indent=1))


if __name__ == "__main__":
    main()
