"""Per-GEMV speed of the standalone kernels (int8, int4-g64, TEAL-sparse bf16/int8) against cuBLAS bf16 and
the peers, at Llama-3-8B projection shapes and decode batches of 1-64 tokens, on one GPU.

    set -o pipefail; PYTHONUNBUFFERED=1 python3 experiments/speed/kernels/bench_gemv.py --out $OUT/gemv.json

1. warm-up: every Triton kernel the run will launch is compiled first in parallel worker processes (the
   on-disk Triton cache then serves the main process; timings are never taken in the workers);
2. correctness: every launch config of the new kernels on fresh random inputs against a float32 (TF32 off)
   reference, outputs poisoned with NaN first; rel. error ||out - ref|| / ||ref|| must be < 1e-2; every
   timed peer's output is checked the same way;
3. timing: each variant is captured in one CUDA graph that runs it over R distinct copies of its weights
   and inputs (R chosen so the smallest format's copies exceed 3x L2: the weights come from HBM, not L2),
   median of the replays / R. The new kernels' launch configs are tuned the same way (fewer replays).
   Achieved GB/s counts the bytes the format must read (sparse: the kept rows only).

--dry runs the flow on the CPU through the Triton interpreter (tiny shapes, fp16, wall-clock "timings").
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
TOKENS = (1, 2, 4, 8, 16, 32, 64)
SPARSE_TOKENS = (1, 2, 4, 8, 16)
SPARSE_SHAPES = ("qkv", "o", "gate_up", "down")
GEMLITE_SHAPES = ("qkv", "o", "gate_up", "down")  # its shipped H100 configs cover these (no autotune)
GEMLITE_TOKENS = (1, 8, 32, 64)  # fewer compiles in the warm-up
TOL = 1e-2
GROUP = 64


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# timing
def graph_us(fns, iters, dry=False):
    """Median microseconds per call of the callables in `fns` (one graph runs them all once, in order)."""
    import torch
    if dry:
        t0 = time.perf_counter()
        for f in fns:
            f()
        return (time.perf_counter() - t0) / len(fns) * 1e6
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del g
    return statistics.median(times) * 1e3 / len(fns)


def copy_gbps(dry):
    import torch
    if dry:
        return 1.0
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = graph_us([lambda: dst.copy_(src)], 50)
    del src, dst
    return 2 * (1 << 30) / us / 1e3


def rel_err(got, want):
    import torch
    got = got.float()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------------------------
# warm-up in worker processes
def _warm_task(task):
    """Run one family/config once on a small problem with the real shapes' divisibility (or, for the
    peers, on the real shape) so that its Triton kernels land in the on-disk cache."""
    t0 = time.perf_counter()
    try:
        import torch
        torch.manual_seed(0)
        kind = task[0]
        dev = "cuda"
        if kind in ("int8", "int4", "sparse"):
            from workbench.kernels import gemv_int4, gemv_int8, gemv_sparse
            from workbench.formats.quant import quantize_int4, quantize_int8_channel
            n, k = 512, 4096  # K as the real shapes' (divisible by every block; split-K in every config)
            w = torch.randn(n, k, device=dev) * 0.05
            _, m, cfg = task
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            if kind == "int8":
                gemv_int8.launch(x, gemv_int8.pack(quantize_int8_channel(w)), cfg)
            elif kind == "int4":
                t = quantize_int4(w, GROUP, symmetric=not cfg.get("asym", False))
                gemv_int4.launch(x, gemv_int4.pack(t), cfg)
            else:
                p = gemv_sparse.pack_int8(quantize_int8_channel(w)) if cfg.get("int8") else gemv_sparse.pack(
                    w.to(torch.bfloat16))
                gemv_sparse.launch(x, torch.zeros(m, device=dev), p, cfg)
        elif kind == "old":
            _, what, m = task
            from workbench.kernels.quant_gemv import quant_gemv
            from workbench.kernels.sparse_gemv import gather_gemv, sparse_gemv
            from workbench.kernels.topk import topk_select, topk_threshold
            from workbench.formats.quant import quantize_int4, quantize_int8_channel
            n, k = 4096, 4096
            w = torch.randn(n, k, device=dev) * 0.05
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            if what == "q8":
                quant_gemv(x, quantize_int8_channel(w))
            elif what == "q4":
                quant_gemv(x, quantize_int4(w, GROUP))
            elif what in ("sp16", "sp8"):
                wt = w.to(torch.bfloat16).t().contiguous() if what == "sp16" else quantize_int8_channel(w)["q"].t().contiguous()
                sc = None if what == "sp16" else quantize_int8_channel(w)["scale"]
                sparse_gemv(x, topk_threshold(x, k // 2), wt, sc)
                if m == 1:
                    sel = topk_select(x, k // 2)
                    gather_gemv(x, sel.idx, sel.count, k // 2, wt, sc)
        elif kind == "gemlite":
            _, bits, name, m = task
            import gemlite
            _gemlite_setup(gemlite)
            n, k = SHAPES[name]
            w = torch.randn(n, k, device=dev) * 0.05
            layer = _gemlite_layer(gemlite, bits, w)
            layer(torch.randn(m, k, device=dev, dtype=torch.bfloat16))
        torch.cuda.synchronize()
        return task, time.perf_counter() - t0, None
    except Exception as e:  # noqa: BLE001
        return task, time.perf_counter() - t0, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def warm(tasks, workers):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    t0 = time.perf_counter()
    errors = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        for task, sec, err in ex.map(_warm_task, tasks):
            if err:
                errors.append((task, err))
    log(f"warm-up: {len(tasks)} tasks on {workers} workers in {time.perf_counter() - t0:.1f} s, {len(errors)} failed")
    for task, err in errors[:12]:
        log(f"  warm failed {task}: {err}")
    return errors


# ---------------------------------------------------------------------------------------------------------------
# gemlite (a peer; skipped with one line when absent or failing)
def _gemlite_setup(gemlite):
    cfg = os.path.join(os.path.dirname(gemlite.__file__), "configs", "h100.json")
    gemlite.load_config(cfg, print_error=False)


def _gemlite_layer(gemlite, bits, w):
    """gemlite on our quantized weights: int4 g64 with HQQ's W = (W_q - zero) * scale (zero = 8), or
    int8 per channel (its A16W8_INT8 with our q and scale)."""
    import torch
    from workbench.formats.quant import quantize_int4, quantize_int8_channel, unpack_int4
    if bits == 4:
        t = quantize_int4(w, GROUP)
        q = unpack_int4(t["q"])
        scales = t["scale"].to(torch.bfloat16)
        zeros = torch.full_like(scales, 8)
        return gemlite.helper.A16Wn(dtype=torch.bfloat16).from_weights(q, scales, zeros, W_nbits=4, group_size=GROUP)
    t = quantize_int8_channel(w)
    return gemlite.helper.A16W8_INT8(dtype=torch.bfloat16).from_weights(t["q"], scales=t["scale"][:, None])


# ---------------------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).with_name("gemv_local.json")))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--families", default="int8,int4,sparse")
    ap.add_argument("--peers", default="old,tinygemm,gemlite")
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--no-warm", action="store_true")
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--tune-iters", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=230, help="stop starting new shapes after this many seconds")
    ap.add_argument("--list-warm", action="store_true", help="print the warm-up tasks and exit")
    ap.add_argument("--dry", action="store_true", help="CPU + Triton interpreter, tiny shapes (flow check only)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    if args.dry:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.nn.functional as F
    import triton
    from workbench.kernels import gemv_int4, gemv_int8, gemv_sparse
    from workbench.formats.quant import dequantize_int4, quantize_int4, quantize_int8_channel

    dry = args.dry
    dev = "cpu" if dry else "cuda"
    act = torch.float16 if dry else torch.bfloat16  # the interpreter has no bf16 arithmetic
    torch.backends.cuda.matmul.allow_tf32 = False
    families = args.families.split(",")
    peers = set(args.peers.split(",")) if args.peers else set()
    tokens = [int(t) for t in args.tokens.split(",")]
    shapes = {name: SHAPES[name] for name in args.shapes.split(",")}
    if dry:
        shapes = {"tiny": (200, 576)}
        peers = set()
        import workbench.kernels.layouts as L
        for mod in (L, gemv_int8, gemv_int4, gemv_sparse):
            mod.sm_count = lambda d: 4
    sms = 4 if dry else torch.cuda.get_device_properties(0).multi_processor_count
    l2 = 8 << 20 if dry else getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    env = {"gpu": "cpu (dry)" if dry else torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "sms": sms, "l2_bytes": l2, "python": sys.version.split()[0]}
    log(f"{env}")

    gemlite = None
    if "gemlite" in peers:
        try:
            import gemlite as _gl
            _gemlite_setup(_gl)
            gemlite = _gl
            env["gemlite"] = getattr(_gl, "__version__", "?")
        except Exception as e:  # noqa: BLE001
            log(f"gemlite skipped: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            env["gemlite"] = None

    def m_classes(ts):
        out = {}
        for m in ts:
            out.setdefault(gemv_int8.block_t(m), m)
        return sorted(out.values())

    def token_classes(fam):
        """One token count per compiled variant: M = 1 (sparse: its own kernels), 2-16, 32, 64."""
        ts = [t for t in tokens if fam != "sparse" or t in SPARSE_TOKENS or dry]
        out = sorted(set(m_classes([t for t in ts if t > 1])) | ({1} if 1 in ts else set()))
        return out

    # ---- configs per family and token count (the split is a runtime argument, not a compile) ----
    def cands(fam, m, n, k):
        if fam == "int8":
            return gemv_int8.candidates(m, n, k, dev)
        if fam == "int4":
            return gemv_int4.candidates(m, n, k, GROUP, dev)
        if fam == "sparse16":
            return gemv_sparse.candidates(m, n, k, False, dev)
        return gemv_sparse.candidates(m, n, k, True, dev)

    # ---- 1. warm-up ----
    if (not dry and not args.no_warm) or args.list_warm:
        tasks = []
        seen = set()
        for fam in families:
            subs = ("sparse16", "sparse8") if fam == "sparse" else (fam,)
            for sub in subs:
                for m in token_classes(fam):
                    for c in cands(sub, m, 4096, 4096):
                        for split in (1, 2):
                            cfg = dict(c, split=split)
                            if sub == "sparse8":
                                cfg["int8"] = True
                            key = (fam, m if m == 1 else gemv_int8.block_t(m), json.dumps(cfg, sort_keys=True))
                            if key in seen:
                                continue
                            seen.add(key)
                            tasks.append((fam, m, cfg))
                    if fam == "int4":  # asymmetric: its exact-mode configs
                        for c in gemv_int4.candidates(m, 4096, 4096, GROUP, dev, asym=True):
                            tasks.append(("int4", m, dict(c, asym=True)))
        if "old" in peers:
            for m in sorted(set(m_classes([t for t in tokens if t > 1])) | {1}):  # its BLOCK_M: 1, 16, 32, 64
                tasks += [("old", "q8", m), ("old", "q4", m)]
            for m in (1, 2):
                tasks += [("old", "sp16", m), ("old", "sp8", m)]
        if gemlite is not None:
            for bits in (8, 4):
                for name in GEMLITE_SHAPES:
                    if name in shapes:
                        for m in tokens:
                            if m in GEMLITE_TOKENS:
                                tasks.insert(0, ("gemlite", bits, name, m))  # the slowest first
        if args.list_warm:
            for t in tasks:
                log(t)
            log(f"{len(tasks)} tasks")
            return
        warm(tasks, args.workers)
        log(f"[{time.perf_counter() - t_start:.0f} s] warm-up done")

    rows, checks = [], []

    # ---- 2. correctness of every config (one shape, each token class), fresh inputs, poisoned outputs ----
    def check_all():
        n, k = (200, 576) if dry else (6144, 4096)
        for fam in families:
            subs = ("sparse16", "sparse8") if fam == "sparse" else (fam,)
            for sub in subs:
                for m in token_classes(fam):
                    w = torch.randn(n, k, device=dev) * 0.05
                    x = torch.randn(m, k, device=dev, dtype=act)
                    asyms = (False, True) if sub == "int4" else (False,)
                    for asym in asyms:
                        if sub == "int8":
                            t = quantize_int8_channel(w)
                            p = gemv_int8.pack(t)
                            ref = (x.float() @ t["q"].float().T) * t["scale"][None, :]
                            run = lambda c: gemv_int8.launch(x, p, c, y=torch.full((m, n), float("nan"), device=dev, dtype=act))
                        elif sub == "int4":
                            t = quantize_int4(w, GROUP, symmetric=not asym)
                            p = gemv_int4.pack(t)
                            ref = x.float() @ dequantize_int4(t).T
                            run = lambda c: gemv_int4.launch(x, p, c, y=torch.full((m, n), float("nan"), device=dev, dtype=act))
                        else:
                            t8 = quantize_int8_channel(w)
                            p = gemv_sparse.pack_int8(t8) if sub == "sparse8" else gemv_sparse.pack(w.to(act))
                            thr = torch.kthvalue(x.abs().float(), k // 2, dim=1).values
                            ref = gemv_sparse.reference(x, thr, p)
                            run = lambda c: gemv_sparse.launch(x, thr, p, c, y=torch.full((m, n), float("nan"), device=dev, dtype=act))
                        cl = cands(sub, m, n, k)
                        if asym:
                            cl = gemv_int4.candidates(m, n, k, GROUP, dev, asym=True)[:3]
                        for c in cl:
                            e = rel_err(run(c), ref)
                            checks.append(dict(family=sub + ("-asym" if asym else ""), m=m, n=n, k=k, config=c, rel_err=e))
                            if not e < TOL:
                                log(f"CHECK FAILED {sub}{'-asym' if asym else ''} m={m} {c}: rel err {e:.3g}")
        bad = [c for c in checks if not c["rel_err"] < TOL]
        log(f"correctness: {len(checks)} config checks, {len(bad)} failed, max rel err "
            f"{max(c['rel_err'] for c in checks):.2e}")
        return bad

    bad = check_all()
    log(f"[{time.perf_counter() - t_start:.0f} s] correctness done")
    copy_gbps(dry)  # the first one runs at idle clocks
    bw = copy_gbps(dry)
    env["copy_gb_per_s"] = bw
    log(f"copy bandwidth (read + write) {bw:.0f} GB/s")

    # ---- 3. timing ----
    def add(fam, variant, name, n, k, m, us, nbytes, err=None, config=None, extra=None):
        r = dict(family=fam, variant=variant, shape=name, n=n, k=k, m=m, us=us, bytes=nbytes,
                 gb_per_s=nbytes / us / 1e3 if us else None, rel_err=err, config=config)
        if extra:
            r.update(extra)
        rows.append(r)
        return r

    def tune(run_cfg, cl, iters):
        best, best_us = None, float("inf")
        for c in cl:
            try:
                us = run_cfg(c, iters)
            except Exception as e:  # noqa: BLE001
                log(f"  config {c} failed: {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}")
                continue
            if us < best_us:
                best, best_us = c, us
        return best, best_us

    def dump(final=False):
        out = {"env": env, "checks_failed": bad, "n_checks": len(checks), "rows": rows, "complete": final,
               "max_check_err": max((c["rel_err"] for c in checks), default=None),
               "seconds": time.perf_counter() - t_start}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1, default=str) + "\n")

    for name, (n, k) in shapes.items():
        if time.perf_counter() - t_start > args.budget_s:
            log(f"budget reached: skipping shape {name}")
            continue
        torch.manual_seed(hash(name) % 1000)
        w = (torch.randn(n, k, device=dev) * 0.02)
        wb = w.to(act)
        i4_bytes = n * k // 2 + 2 * n * (k // GROUP)
        reps = 1 if dry else max(2, min(24, math.ceil(3 * l2 / i4_bytes)))
        t8 = quantize_int8_channel(w)
        t4 = quantize_int4(w, GROUP)
        deq4 = dequantize_int4(t4)
        p8, p4 = gemv_int8.pack(t8), gemv_int4.pack(t4)
        copies = {}

        def clone(obj):
            if torch.is_tensor(obj):
                return obj.clone()
            if isinstance(obj, dict):
                return {kk: clone(vv) for kk, vv in obj.items()}
            if isinstance(obj, tuple):
                return tuple(clone(vv) for vv in obj)
            return obj

        def cp(key, make):
            """`reps` distinct copies (distinct memory) of one weight in some layout."""
            if key not in copies:
                base = make()
                copies[key] = [base] + [clone(base) for _ in range(reps - 1)]
            return copies[key]

        gl_cache = {}

        def gl_layers(bits):
            """`reps` gemlite layers of this weight (built once per shape)."""
            if bits not in gl_cache:
                gl_cache[bits] = [_gemlite_layer(gemlite, bits, w) for _ in range(reps)]
            return gl_cache[bits]

        W = cp("bf16", lambda: wb)
        P8 = cp("p8", lambda: p8)
        P4 = cp("p4", lambda: p4)
        log(f"== {name} {n}x{k}: {reps} weight copies per variant [{time.perf_counter() - t_start:.0f} s]")
        for m in tokens:
            X = [torch.randn(m, k, device=dev, dtype=act) for _ in range(reps)]
            ref8 = (X[0].float() @ t8["q"].float().T) * t8["scale"][None, :]
            ref4 = X[0].float() @ deq4.T
            ref16 = X[0].float() @ wb.float().T
            us_cublas = graph_us([lambda x=x, w_=w_: F.linear(x, w_) for x, w_ in zip(X, W)], args.iters, dry)
            add("dense", "cuBLAS bf16", name, n, k, m, us_cublas, 2 * n * k, rel_err(F.linear(X[0], W[0]), ref16))
            base = dict(cublas_us=us_cublas)
            best8 = gemv_int8.candidates(m, n, k, dev)[0]
            if "int8" in families:
                run = lambda c, it: graph_us([lambda x=x, p=p: gemv_int8.launch(x, p, c) for x, p in zip(X, P8)], it, dry)
                best, _ = tune(run, cands("int8", m, n, k), args.tune_iters)
                us = run(best, args.iters)
                e = rel_err(gemv_int8.launch(X[0], P8[0], best, y=torch.full((m, n), float("nan"), device=dev, dtype=act)), ref8)
                add("int8", "ours int8", name, n, k, m, us, n * k + 4 * n, e, best, base)
                best8 = best
                if "old" in peers:
                    from workbench.kernels.quant_gemv import quant_gemv
                    quant_gemv(X[0], t8)  # tunes outside the capture
                    us = graph_us([lambda x=x, p=p: quant_gemv(x, {"q": p["q"], "scale": p["scale"]}) for x, p in zip(X, P8)], args.iters)
                    add("int8", "old quant_gemv int8", name, n, k, m, us, n * k + 4 * n, rel_err(quant_gemv(X[0], t8), ref8), None, base)
                if gemlite is not None and name in GEMLITE_SHAPES and m in GEMLITE_TOKENS:
                    try:
                        gls = gl_layers(8)
                        e = rel_err(gls[0](X[0]), ref8)
                        us = graph_us([lambda x=x, g=g: g(x) for x, g in zip(X, gls)], args.iters)
                        add("int8", "gemlite int8", name, n, k, m, us, n * k + 4 * n, e, None, base)
                    except Exception as ex:  # noqa: BLE001
                        log(f"  gemlite int8 {name} m={m} failed: {type(ex).__name__}: {str(ex).splitlines()[0][:150] if str(ex) else ''}")
            if "int4" in families:
                run = lambda c, it: graph_us([lambda x=x, p=p: gemv_int4.launch(x, p, c) for x, p in zip(X, P4)], it, dry)
                best, _ = tune(run, cands("int4", m, n, k), args.tune_iters)
                us = run(best, args.iters)
                e = rel_err(gemv_int4.launch(X[0], P4[0], best, y=torch.full((m, n), float("nan"), device=dev, dtype=act)), ref4)
                add("int4", "ours int4-g64", name, n, k, m, us, i4_bytes, e, best, base)
                if "old" in peers:
                    from workbench.kernels.quant_gemv import quant_gemv
                    from workbench.kernels.peers import tinygemm_pack
                    T4 = cp("t4", lambda: t4)
                    quant_gemv(X[0], t4)
                    us = graph_us([lambda x=x, t=t: quant_gemv(x, t) for x, t in zip(X, T4)], args.iters)
                    add("int4", "old quant_gemv int4", name, n, k, m, us, i4_bytes, rel_err(quant_gemv(X[0], t4), ref4), None, base)
                if "tinygemm" in peers:
                    try:
                        from workbench.kernels.peers import tinygemm_pack
                        TG = cp("tg", lambda: tinygemm_pack(t4))
                        f = lambda x, tg: torch.ops.aten._weight_int4pack_mm(x, tg[0], tg[2], tg[1])
                        e = rel_err(f(X[0], TG[0]), ref4)
                        us = graph_us([lambda x=x, tg=tg: f(x, tg) for x, tg in zip(X, TG)], args.iters)
                        add("int4", "aten tinygemm int4-g64", name, n, k, m, us, i4_bytes + 2 * n * (k // GROUP), e, None, base)
                    except Exception as ex:  # noqa: BLE001
                        log(f"  tinygemm {name} m={m} failed: {type(ex).__name__}: {str(ex).splitlines()[0][:150] if str(ex) else ''}")
                if gemlite is not None and name in GEMLITE_SHAPES and m in GEMLITE_TOKENS:
                    try:
                        gls = gl_layers(4)
                        e = rel_err(gls[0](X[0]), ref4)
                        us = graph_us([lambda x=x, g=g: g(x) for x, g in zip(X, gls)], args.iters)
                        add("int4", "gemlite int4-g64", name, n, k, m, us, i4_bytes, e, None, base)
                    except Exception as ex:  # noqa: BLE001
                        log(f"  gemlite int4 {name} m={m} failed: {type(ex).__name__}: {str(ex).splitlines()[0][:150] if str(ex) else ''}")
            if "sparse" in families and (dry or name in SPARSE_SHAPES) and m in SPARSE_TOKENS:
                WT = cp("wt", lambda: gemv_sparse.pack(wb))
                QT = cp("qt", lambda: gemv_sparse.pack_int8(t8))
                TH = [torch.kthvalue(x.abs().float(), k // 2, dim=1).values for x in X]  # 50% kept per token
                kept = sum((x.abs().float() > t[:, None]).any(0).float().mean().item() for x, t in zip(X, TH)) / reps
                sref16 = gemv_sparse.reference(X[0], TH[0], WT[0])
                sref8 = gemv_sparse.reference(X[0], TH[0], QT[0])
                ex_ = dict(base, kept_frac=kept, sparsity=0.5)
                us_mask = graph_us([lambda x=x, t=t, w_=w_: F.linear(gemv_sparse.mask_input(x, t), w_)
                                    for x, t, w_ in zip(X, TH, W)], args.iters, dry)
                add("sparse", "mask + cuBLAS bf16", name, n, k, m, us_mask, 2 * n * k,
                    rel_err(F.linear(gemv_sparse.mask_input(X[0], TH[0]), W[0]), sref16), None, ex_)
                for sub, PP, sref, per in (("sparse16", WT, sref16, 2), ("sparse8", QT, sref8, 1)):
                    run = lambda c, it: graph_us([lambda x=x, t=t, p=p: gemv_sparse.launch(x, t, p, c)
                                                  for x, t, p in zip(X, TH, PP)], it, dry)
                    best, _ = tune(run, cands(sub, m, n, k), args.tune_iters)
                    us = run(best, args.iters)
                    e = rel_err(gemv_sparse.launch(X[0], TH[0], PP[0], best,
                                                   y=torch.full((m, n), float("nan"), device=dev, dtype=act)), sref)
                    add("sparse", f"ours sparse {'int8' if per == 1 else 'bf16'}", name, n, k, m, us,
                        kept * k * n * per + (4 * n if per == 1 else 0), e, best, dict(ex_, mask_cublas_us=us_mask))
                if "int8" in families:
                    us = graph_us([lambda x=x, t=t, p=p: gemv_int8.launch(gemv_sparse.mask_input(x, t), p, best8)
                                   for x, t, p in zip(X, TH, P8)], args.iters, dry)
                    add("sparse", "mask + ours int8 dense", name, n, k, m, us, n * k + 4 * n, None, None, ex_)
                if "old" in peers:
                    from workbench.kernels.sparse_gemv import gather_gemv, sparse_gemv
                    from workbench.kernels.topk import topk_select
                    for label, PP, sref, per in (("bf16", WT, sref16, 2), ("int8", QT, sref8, 1)):
                        sc = lambda p: p.get("scale")
                        sparse_gemv(X[0], TH[0], PP[0]["wt"], sc(PP[0]))
                        us = graph_us([lambda x=x, t=t, p=p: sparse_gemv(x, t, p["wt"], sc(p)) for x, t, p in zip(X, TH, PP)],
                                      args.iters)
                        add("sparse", f"old sparse_gemv {label}", name, n, k, m, us, kept * k * n * per,
                            rel_err(sparse_gemv(X[0], TH[0], PP[0]["wt"], sc(PP[0])), sref), None, ex_)
                        if m == 1:
                            SEL = [topk_select(x, k // 2) for x in X]
                            gather_gemv(X[0], SEL[0].idx, SEL[0].count, k // 2, PP[0]["wt"], sc(PP[0]))
                            us = graph_us([lambda x=x, s=s, p=p: gather_gemv(x, s.idx, s.count, k // 2, p["wt"], sc(p))
                                           for x, s, p in zip(X, SEL, PP)], args.iters)
                            add("sparse", f"old gather_gemv {label} (top-k given)", name, n, k, m, us, kept * k * n * per,
                                rel_err(gather_gemv(X[0], SEL[0].idx, SEL[0].count, k // 2, PP[0]["wt"], sc(PP[0])), sref),
                                None, ex_)
            line = [r for r in rows if r["shape"] == name and r["m"] == m]
            log(f"  m={m:2d} " + "  ".join(f"{r['variant']}={r['us']:.1f}" for r in line))
        del copies, W, P8, P4, gl_cache
        dump()
        if not dry:
            torch.cuda.empty_cache()

    # ---- summary ----
    dump(final=True)
    print_table(rows, bw)
    log(f"wrote {args.out} [{time.perf_counter() - t_start:.0f} s]")


def print_table(rows, bw):
    """Compact: per family, shape and M: ours us, cuBLAS us, speedup, GB/s, best peer."""
    log(f"\ncopy bandwidth {bw:.0f} GB/s. us per GEMV (graph replay, cold weights); x = cuBLAS bf16 time / ours")
    for fam, ours in (("int8", "ours int8"), ("int4", "ours int4-g64"), ("sparse", "ours sparse bf16"),
                      ("sparse", "ours sparse int8")):
        sel = [r for r in rows if r["variant"] == ours]
        if not sel:
            continue
        log(f"-- {ours}")
        log(f"{'shape':8s} {'M':>3s} {'ours':>7s} {'cuBLAS':>7s} {'x':>5s} {'GB/s':>6s} {'err':>7s}  best peer")
        for r in sel:
            peers = [p for p in rows if p["family"] == fam and p["shape"] == r["shape"] and p["m"] == r["m"]
                     and p["variant"] != ours and not p["variant"].startswith("ours")]
            best = min(peers, key=lambda p: p["us"]) if peers else None
            extra = f"{best['variant']} {best['us']:.1f}" if best else ""
            if fam == "sparse":
                extra += f" | kept {r.get('kept_frac', 0):.2f}, vs mask+cuBLAS {r['mask_cublas_us'] / r['us']:.2f}x"
            err = r["rel_err"] if r["rel_err"] is not None else float("nan")
            log(f"{r['shape']:8s} {r['m']:3d} {r['us']:7.1f} {r['cublas_us']:7.1f} {r['cublas_us'] / r['us']:5.2f} "
                f"{r['gb_per_s']:6.0f} {err:7.1e}  {extra}")


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
