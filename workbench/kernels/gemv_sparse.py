"""TEAL-style activation-sparse GEMV: y = W @ (x * (|x| > t)), one threshold per token, 1-64 tokens.

The weight is stored transposed, (K, N) (`pack`: bf16/fp16; `pack_int8`: int8 q^T (K, N) with one
float32 scale per output, fused sparsity + int8). Input channel k's weights are one contiguous row, so
a weight row that no token keeps is never read: its load is predicated off (cp.async with zero fill),
and the bytes read fall with the sparsity. With several tokens a row is read when any token keeps it
(the union), each token still multiplying only its own kept inputs.

Three kernels:
* `gather` (M = 1): a program takes a slab of inputs, lists its kept ones (prefix sum, into its own
  scratch row) and walks only those weight rows, so every byte it loads is used (the masked-row kernels
  below issue the skipped rows' loads predicated off: half the bytes in flight at 50% sparsity). Modes:
  `gather_dot` feeds each chunk of kept rows to `tl.dot` (the token in row 0 of a 16-row tile), so Triton's
  pipeliner keeps several chunks in flight through shared memory (the fastest on bf16: gate|up 1.52x
  cuBLAS at 50% on an H200); `gather_db` loads the next chunk before this one's FMAs and converts int8
  rows by the exponent trick (the fastest fused sparse+int8); `gather` loads, then FMAs.
* `dot`: each step loads the (BLOCK_T, BLOCK_K) token tile, builds the per-token keep mask and its
  union over tokens, loads the (BLOCK_K, BLOCK_N) weight tile with rows masked by the union
  (`num_stages` deep in shared memory) and `tl.dot`s the masked tokens with it (int8: converted to
  bf16/fp16 in registers, exact). Any M <= 64.
* `fma` (M = 1): the masked-row loads into registers, products accumulated in float32 by FMAs.
* `cuda` (M = 1): `sparse_gemv.cu`'s `sparse_gemv1` in CUDA C++: kept inputs listed per warp in shared
  memory by ballots, their rows streamed with several 16-byte loads per thread in flight (see the file).
A program owns BLOCK_N outputs and a K range (split-K through `layouts.store_tile`: one launch).
Reference: `reference`, float64 `(x * (|x| > t)) @ W.T`.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from workbench.kernels import mma_cuda
from workbench.kernels.layouts import locks, sm_count, split_outputs, split_plan, splits_for, store_tile, workspace
from workbench.kernels.pdl import enter, launch_kwargs

MAX_TOKENS = 64


@triton.jit
def _as_f32(w):
    """A weight tile in float32. int8 by the exponent trick (2^23 + 128 + q is a float whose low mantissa
    byte is q + 128; subtracting 2^23 + 128 gives q exactly): integer adds and one float add at full rate,
    where the int-to-float conversion instruction runs at 1/8 rate and caps fused sparse+int8 below the
    bandwidth."""
    if w.dtype == tl.int8:
        return (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    else:
        return w.to(tl.float32)


@triton.jit(do_not_specialize=["M", "STEPS", "n_split"])
def _sparse_dot_gemv_kernel(x_ptr, t_ptr, w_ptr, s_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, stride_xm, stride_ym, STEPS,
                       n_split, HAS_SCALE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, USE_WS: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr):
    enter(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N
    offs_t = tl.arange(0, BLOCK_T)
    t_mask = offs_t < M
    thr = tl.load(t_ptr + offs_t, mask=t_mask, other=float("inf"))
    offs_kk = tl.arange(0, BLOCK_K)
    k_lo = pid_k * STEPS * BLOCK_K
    n_steps = (K - k_lo + BLOCK_K - 1) // BLOCK_K
    if n_steps > STEPS:
        n_steps = STEPS
    x_ptrs = x_ptr + offs_t[:, None] * stride_xm + (k_lo + offs_kk)[None, :]
    w_ptrs = w_ptr + (k_lo + offs_kk).to(tl.int64)[:, None] * N + rn[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for i in range(0, n_steps):
        k_mask = (k_lo + i * BLOCK_K + offs_kk) < K
        if EVEN_K:
            x = tl.load(x_ptrs, mask=t_mask[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        keep = tl.abs(x.to(tl.float32)) > thr[:, None]  # padded tokens: x = 0 < inf
        if not EVEN_K:
            keep = keep & k_mask[None, :]
        need = tl.max(keep.to(tl.int32), axis=0) > 0  # any token keeps input k (rows past K: x = 0)
        w = tl.load(w_ptrs, mask=need[:, None], other=0)
        xs = tl.where(keep, x, 0.0).to(x_ptr.dtype.element_ty)
        acc = tl.dot(xs, w.to(x_ptr.dtype.element_ty), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * N
    if HAS_SCALE:
        acc = acc * tl.load(s_ptr + rn)[None, :]
    store_tile(acc, y_ptr, ws_ptr, lock_ptr, offs_t, offs_n, M, N, stride_ym, pid_n, pid_k, n_split,
               USE_WS=USE_WS, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N)


@triton.jit(do_not_specialize=["M", "STEPS", "n_split"])
def _sparse_fma_gemv_kernel(x_ptr, t_ptr, w_ptr, s_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, stride_xm, stride_ym, STEPS,
                       n_split, HAS_SCALE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, USE_WS: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr):
    enter(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N
    thr = tl.load(t_ptr)
    offs_kk = tl.arange(0, BLOCK_K)
    k_lo = pid_k * STEPS * BLOCK_K
    n_steps = (K - k_lo + BLOCK_K - 1) // BLOCK_K
    if n_steps > STEPS:
        n_steps = STEPS
    x_ptrs = x_ptr + k_lo + offs_kk
    w_ptrs = w_ptr + (k_lo + offs_kk).to(tl.int64)[:, None] * N + rn[None, :]
    acc2 = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for i in range(0, n_steps):
        k_mask = (k_lo + i * BLOCK_K + offs_kk) < K
        if EVEN_K:
            x = tl.load(x_ptrs).to(tl.float32)
        else:
            x = tl.load(x_ptrs, mask=k_mask, other=0.0).to(tl.float32)
        keep = tl.abs(x) > thr
        if not EVEN_K:
            keep = keep & k_mask
        w = tl.load(w_ptrs, mask=keep[:, None], other=0)
        acc2 += _as_f32(w) * tl.where(keep, x, 0.0)[:, None]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * N
    acc = tl.sum(acc2, axis=0)[None, :]
    if HAS_SCALE:
        acc = acc * tl.load(s_ptr + rn)[None, :]
    store_tile(acc, y_ptr, ws_ptr, lock_ptr, tl.arange(0, 1), offs_n, M, N, stride_ym, pid_n, pid_k, n_split,
               USE_WS=USE_WS, BLOCK_T=1, BLOCK_N=BLOCK_N)


@triton.jit
def _kept_list(x_ptr, t_ptr, idx_ptr, pid_n, pid_k, n_split, K, SLAB: tl.constexpr):
    """One token's kept inputs in this program's slab of SLAB, listed in order (prefix sum) in its own
    scratch row: (row pointer, count)."""
    thr = tl.load(t_ptr)
    offs = pid_k * SLAB + tl.arange(0, SLAB)
    in_k = offs < K
    xv = tl.load(x_ptr + offs, mask=in_k, other=0.0).to(tl.float32)
    keep = (tl.abs(xv) > thr) & in_k
    ki = keep.to(tl.int32)
    count = tl.sum(ki, axis=0)
    pos = tl.cumsum(ki, axis=0) - 1
    row = idx_ptr + (pid_n * n_split + pid_k).to(tl.int64) * SLAB
    tl.store(row + pos, offs, mask=keep)
    tl.debug_barrier()  # the list is complete before anyone reads it
    return row, count


@triton.jit(do_not_specialize=["M", "n_split"])
def _sparse_gather_gemv_kernel(x_ptr, t_ptr, w_ptr, s_ptr, y_ptr, ws_ptr, lock_ptr, idx_ptr, M, N, K, stride_xm, stride_ym,
                          n_split, HAS_SCALE: tl.constexpr, SLAB: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, USE_WS: tl.constexpr, MODE: tl.constexpr, PDL: tl.constexpr):
    """One token. A program takes a slab of SLAB inputs, lists the kept ones, then walks only the kept
    weight rows, BLOCK_K at a time: every loaded byte is used. MODE 0: load then FMA, one chunk in
    flight; MODE 1: the next chunk's rows are loaded before this chunk's FMAs (two in flight, by hand:
    Triton pipelines only dot operands); MODE 2: `tl.dot` on a one-token tile, so Triton's pipeliner
    keeps `num_stages` chunks in flight through shared memory."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N
    enter(PDL)  # the kept rows depend on x: nothing to prefetch before it is there
    row, count = _kept_list(x_ptr, t_ptr, idx_ptr, pid_n, pid_k, n_split, K, SLAB)
    offs_p = tl.arange(0, BLOCK_K)
    if MODE == 2:
        offs_t = tl.arange(0, 16)
        acc16 = tl.zeros([16, BLOCK_N], dtype=tl.float32)
        for p0 in range(0, count, BLOCK_K):
            pm = (p0 + offs_p) < count
            kk = tl.load(row + p0 + offs_p, mask=pm, other=0)
            xk = tl.load(x_ptr + kk, mask=pm, other=0.0)
            w = tl.load(w_ptr + kk.to(tl.int64)[:, None] * N + rn[None, :], mask=pm[:, None], other=0)
            xa = tl.where(offs_t[:, None] == 0, xk[None, :], 0.0).to(x_ptr.dtype.element_ty)
            acc16 = tl.dot(xa, w.to(x_ptr.dtype.element_ty), acc16)
        acc = tl.sum(tl.where(offs_t[:, None] == 0, acc16, 0.0), axis=0)[None, :]
    else:
        acc2 = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        if MODE == 1:
            pm = offs_p < count
            kk = tl.load(row + offs_p, mask=pm, other=0)
            xk = tl.load(x_ptr + kk, mask=pm, other=0.0)
            w = tl.load(w_ptr + kk.to(tl.int64)[:, None] * N + rn[None, :], mask=pm[:, None], other=0)
            for p0 in range(BLOCK_K, count + BLOCK_K, BLOCK_K):
                pm_n = (p0 + offs_p) < count
                kk_n = tl.load(row + p0 + offs_p, mask=pm_n, other=0)
                xk_n = tl.load(x_ptr + kk_n, mask=pm_n, other=0.0)
                w_n = tl.load(w_ptr + kk_n.to(tl.int64)[:, None] * N + rn[None, :], mask=pm_n[:, None], other=0)
                acc2 += _as_f32(w) * xk.to(tl.float32)[:, None]
                w = w_n
                xk = xk_n
        else:
            for p0 in range(0, count, BLOCK_K):
                pm = (p0 + offs_p) < count
                kk = tl.load(row + p0 + offs_p, mask=pm, other=0)
                xk = tl.load(x_ptr + kk, mask=pm, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + kk.to(tl.int64)[:, None] * N + rn[None, :], mask=pm[:, None], other=0)
                acc2 += _as_f32(w) * xk[:, None]
        acc = tl.sum(acc2, axis=0)[None, :]
    if HAS_SCALE:
        acc = acc * tl.load(s_ptr + rn)[None, :]
    store_tile(acc, y_ptr, ws_ptr, lock_ptr, tl.arange(0, 1), offs_n, M, N, stride_ym, pid_n, pid_k, n_split,
               USE_WS=USE_WS, BLOCK_T=1, BLOCK_N=BLOCK_N)


GATHER_MODES = {"gather": 0, "gather_db": 1, "gather_dot": 2}


def pack(weight: torch.Tensor) -> dict:
    """W (N, K) bf16/fp16 -> {"wt": W^T (K, N) contiguous}."""
    if weight.dtype not in (torch.bfloat16, torch.float16) or weight.dim() != 2:
        raise ValueError("gemv_sparse.pack needs a bf16/fp16 (N, K) weight")
    return {"wt": weight.t().contiguous()}


def pack_int8(tensors: dict) -> dict:
    """Our int8 per-channel tensors {"q" (N, K), "scale" (N,)} -> {"wt": q^T (K, N) int8, "scale" float32}."""
    q, scale = tensors["q"], tensors["scale"]
    if q.dtype != torch.int8 or scale.dim() != 1:
        raise ValueError("gemv_sparse.pack_int8 needs q int8 (N, K) and scale (N,)")
    return {"wt": q.t().contiguous(), "scale": scale.float().contiguous()}


def block_t(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def candidates(m: int, n: int, k: int, int8: bool, device) -> list[dict]:
    """Launch configs worth timing; the first is the untuned default."""
    sms = sm_count(device)
    if m == 1:  # (kind, block_n, block_k, warps, stages, slab); the winners of sparse_sweep.py on an H200
        shapes = [("gather_dot", 128, 32, 4, 4, 1024), ("gather_dot", 256, 32, 4, 3, 1024),
                  ("gather_dot", 128, 64, 4, 4, 1024), ("gather_dot", 128, 64, 4, 3, 512),
                  ("gather_dot", 128, 32, 4, 4, 2048), ("gather_dot", 256, 64, 4, 4, 2048),
                  ("gather", 256, 64, 8, 1, 1024), ("gather", 256, 32, 4, 1, 256), ("gather_db", 256, 64, 8, 1, 512)]
        if int8:  # tensor-core tiles of K-major int8 rows need byte shuffles: FMAs on converted rows win
            shapes = [("gather_db", 256, 32, 4, 1, 1024), ("gather_db", 256, 64, 8, 1, 1024),
                      ("gather_db", 256, 64, 8, 1, 512), ("gather_db", 512, 32, 4, 1, 1024),
                      ("gather", 512, 64, 8, 1, 1024), ("gather", 256, 64, 4, 1, 512),
                      ("gather_dot", 128, 64, 4, 4, 1024)]
    elif block_t(m) <= 32:
        shapes = [("dot", 256, 32, 4, 4), ("dot", 128, 64, 4, 4), ("dot", 256, 64, 8, 3)]
    else:
        shapes = [("dot", 128, 64, 4, 3), ("dot", 256, 32, 8, 3)]
    out = []
    if m == 1 and n % (16 if int8 else 8) == 0 and mma_cuda.available(device):  # ours in CUDA C++, after Triton's
        out_cuda = [dict(kind="cuda", warps=w, tpr=t, ahead=a, slab=sl) for w, t, a, sl in CUDA_CONFIGS
                    if t * (16 if int8 else 8) <= 32 * w]
    else:
        out_cuda = []
    for kind, bn, bk, w, s, *slab in shapes:
        if kind in GATHER_MODES:
            out.append(dict(kind=kind, block_n=bn, block_k=bk, warps=w, stages=s, slab=slab[0], split=0))
            continue
        tiles, steps = triton.cdiv(n, bn), triton.cdiv(k, bk)
        sp = splits_for(tiles, steps, sms)
        sp.sort(key=lambda s_: abs(tiles * s_ - 2 * sms))
        out += [dict(kind=kind, block_n=bn, block_k=bk, warps=w, stages=s, split=s_) for s_ in sp]
    return out + out_cuda


# (warps, threads per weight row, rows in flight per thread, slab of inputs per block) of `sparse_gemv1`
CUDA_CONFIGS = [(8, 8, 4, 1024), (8, 8, 8, 1024), (8, 16, 4, 1024), (8, 8, 4, 512), (8, 8, 4, 2048),
                (4, 8, 8, 512), (8, 16, 8, 2048), (4, 16, 4, 1024)]


def cuda_fits(x: torch.Tensor, packed: dict) -> bool:
    """Whether `sparse_gemv1` takes this weight: rows of whole 16-byte loads (N a multiple of 8 bf16/fp16
    or 16 int8 weights), 16-byte aligned."""
    wt = packed["wt"]
    per_load = 16 // wt.element_size()
    return wt.is_contiguous() and wt.shape[1] % per_load == 0 and wt.data_ptr() % 16 == 0 and x.shape[0] == 1


def launch(x: torch.Tensor, threshold: torch.Tensor, packed: dict, cfg: dict,
           y: torch.Tensor | None = None) -> torch.Tensor:
    wt, scale = packed["wt"], packed.get("scale")
    m, k = x.shape
    n = wt.shape[1]
    kind = cfg["kind"] if m == 1 else "dot"
    if kind == "cuda":
        if not cuda_fits(x, packed):
            raise ValueError(f"sparse_gemv1 does not take a {tuple(wt.shape)} {wt.dtype} weight")
        return _launch_cuda(x, threshold, packed, cfg, y)
    if kind in GATHER_MODES:
        return _launch_gather(x, threshold, packed, cfg, y)
    bt = 1 if kind == "fma" else block_t(m)
    bn, bk = cfg["block_n"], cfg["block_k"]
    steps, n_split = split_plan(triton.cdiv(k, bk), cfg["split"])
    tiles = triton.cdiv(n, bn)
    y, ws, lk, use_ws = split_outputs(x, m, n, tiles, n_split, bt, bn, y)
    kernel = _sparse_fma_gemv_kernel if kind == "fma" else _sparse_dot_gemv_kernel
    kernel[(tiles, n_split)](x, threshold, wt, wt if scale is None else scale, y, ws, lk, m, n, k, x.stride(0),
                             y.stride(0), steps, n_split, HAS_SCALE=scale is not None, BLOCK_T=bt, BLOCK_N=bn,
                             BLOCK_K=bk, USE_WS=use_ws, EVEN_K=k % bk == 0, num_warps=cfg["warps"],
                             num_stages=cfg["stages"], **launch_kwargs(x.device))
    return y


def _launch_gather(x, threshold, packed, cfg, y):
    wt, scale = packed["wt"], packed.get("scale")
    k = x.shape[1]
    n = wt.shape[1]
    bn, slab = cfg["block_n"], cfg["slab"]
    n_split = triton.cdiv(k, slab)
    tiles = triton.cdiv(n, bn)
    if y is None:
        y = torch.empty(1, n, device=x.device, dtype=x.dtype)
    use_ws = n_split > 1
    part = tiles * n_split * bn
    ws = workspace(x.device, part + tiles * n_split * slab)
    idx = ws[part:part + tiles * n_split * slab].view(torch.int32)
    lk = locks(x.device, tiles) if use_ws else y
    _sparse_gather_gemv_kernel[(tiles, n_split)](x, threshold, wt, wt if scale is None else scale, y, ws if use_ws else y, lk,
                                            idx, 1, n, k, x.stride(0), y.stride(0), n_split,
                                            HAS_SCALE=scale is not None, SLAB=slab, BLOCK_N=bn,
                                            BLOCK_K=cfg["block_k"], USE_WS=use_ws, MODE=GATHER_MODES[cfg["kind"]],
                                            num_warps=cfg["warps"], num_stages=cfg["stages"],
                                            **launch_kwargs(x.device))
    return y


def _launch_cuda(x, threshold, packed, cfg, y):
    wt, scale = packed["wt"], packed.get("scale")
    k, n = wt.shape
    int8 = wt.dtype == torch.int8
    tiles, splits = triton.cdiv(n, cfg["tpr"] * 16 // wt.element_size()), triton.cdiv(k, cfg["slab"])
    if y is None:
        y = torch.empty(1, n, device=x.device, dtype=x.dtype)
    ws = workspace(x.device, splits * n) if splits > 1 else y  # one slab: neither is touched
    lk = locks(x.device, tiles) if splits > 1 else y
    bf16 = "true" if x.dtype == torch.bfloat16 else "false"
    name = (f"sparse_gemv1<{cfg['warps']}, {cfg['tpr']}, {cfg['ahead']}, {cfg['slab']}, {bf16}, "
            f"{'true' if int8 else 'false'}>")
    mma_cuda.launch(name, (tiles, splits, 1), (32 * cfg["warps"], 1, 1),
                    [x, threshold, wt, scale if int8 else wt, y, ws, lk, n, k], x.device)
    return y


def _thresholds(threshold, m: int, device) -> torch.Tensor:
    if isinstance(threshold, torch.Tensor):
        t = threshold.reshape(-1).to(device=device, dtype=torch.float32)
        if t.numel() == 1 and m > 1:
            t = t.expand(m).contiguous()
        if t.numel() != m:
            raise ValueError(f"threshold has {t.numel()} entries for {m} tokens")
        return t.contiguous()
    return torch.full((m,), float(threshold), device=device, dtype=torch.float32)


def sparse_gemv(x: torch.Tensor, threshold, packed: dict, config: dict | None = None) -> torch.Tensor:
    """x (M, K) bf16/fp16, M <= 64; threshold (M,) float32 tensor (or a float for every token)
    -> (M, N) in x's dtype: W @ (x * (|x| > t)) per token (int8: times the per-output scale)."""
    wt = packed["wt"]
    if x.dim() != 2 or x.shape[0] > MAX_TOKENS or x.shape[1] != wt.shape[0]:
        raise ValueError(f"sparse_gemv takes x (M <= {MAX_TOKENS}, K={wt.shape[0]}), got {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16) or (wt.dtype != torch.int8 and wt.dtype != x.dtype):
        raise ValueError("sparse_gemv takes bf16/fp16 activations and a weight of the same dtype (or int8)")
    x = x if x.stride(1) == 1 else x.contiguous()
    t = _thresholds(threshold, x.shape[0], x.device)
    if config is None:
        m, k = x.shape
        n = wt.shape[1]
        cands = candidates(m, n, k, wt.dtype == torch.int8, x.device)
        if os.environ.get("WORKBENCH_TUNE", "1") == "0":
            config = cands[0]
        else:
            from workbench.kernels.tuning import tuned
            config = tuned(("gemv_sparse", block_t(m), m == 1, wt.dtype, m, n, k, x.dtype), cands,
                           lambda c: launch(x, t, packed, c))
    return launch(x, t, packed, config)


def mask_input(x: torch.Tensor, threshold) -> torch.Tensor:
    """x * (|x| > t) per token (the dense peers' first step)."""
    t = _thresholds(threshold, x.shape[0], x.device)
    return torch.where(x.abs() > t[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))  # fp32 compare


def reference(x: torch.Tensor, threshold, packed: dict) -> torch.Tensor:
    """float64 (x * (|x| > t)) @ W^T-stored weight (int8: times scale), as float32."""
    t = _thresholds(threshold, x.shape[0], x.device).double()
    xd = x.double()
    xs = torch.where(xd.abs() > t[:, None], xd, torch.zeros_like(xd))
    y = xs @ packed["wt"].double()
    if "scale" in packed:
        y = y * packed["scale"].double()[None, :]
    return y.float()
