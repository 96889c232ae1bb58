"""TEAL-style sparse GEMV: y = W @ sparsify(x) for 1-16 tokens, skipping the weight rows of zeroed inputs.

The weight is stored transposed, (K, N) ("column-major W"), so input channel k's weights are one
contiguous row: a masked load of that row fetches nothing when every token's |x_k| is at or below its
threshold, and the bytes read fall with the sparsity. The threshold is applied in-kernel, one per token
(a tensor: a calibrated constant, or a per-token top-k cut from `kernels.topk`).

Weights are bf16/fp16, or int8 with one scale per output channel: sparsity and int8 fused in one pass,
which TEAL's kernel cannot do. A program owns BLOCK_N outputs and walks a share of K (split-K, partial
sums meet in a float32 buffer by atomic adds). Programs of the first N tile also count the inputs kept,
so achieved sparsity is measured inside the CUDA graph at no extra launch.
Reference: `F.linear(x * (|x| > t), W)`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from workbench.kernels.tuning import sm_count, split_for, tuned

MAX_TOKENS = 16


@triton.jit
def _sparse_gemv_kernel(x_ptr, t_ptr, wt_ptr, s_ptr, y_ptr, kept_ptr, seen_ptr, M, K, N, MK, stride_xm, stride_ym, K_PER_PROG,
                        HAS_SCALE: tl.constexpr, COUNT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_N: tl.constexpr, ATOMIC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    t = tl.load(t_ptr + offs_m, mask=m_mask, other=float("inf"))
    k_lo = pid_k * K_PER_PROG
    k_hi = k_lo + K_PER_PROG
    if k_hi > K:
        k_hi = K
    kept = tl.zeros([BLOCK_M], dtype=tl.int32)
    if BLOCK_M == 1:
        acc2 = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        keep = (tl.abs(x.to(tl.float32)) > t[:, None]) & k_mask[None, :] & m_mask[:, None]  # (M, BK)
        if COUNT:
            kept += tl.sum(keep.to(tl.int32), axis=1)
        row_needed = tl.max(keep.to(tl.int32), axis=0) > 0  # any token keeps input k
        w = tl.load(wt_ptr + offs_k[:, None] * N + offs_n[None, :], mask=row_needed[:, None] & n_mask[None, :],
                    other=0)  # rows nobody needs are never fetched
        xs = tl.where(keep, x, 0.0)
        if BLOCK_M == 1:
            acc2 += w.to(tl.float32) * tl.trans(xs.to(tl.float32))  # (BK, BN) * (BK, 1)
        else:
            acc += tl.dot(xs.to(x_ptr.dtype.element_ty), w.to(x_ptr.dtype.element_ty))
    if BLOCK_M == 1:
        acc = tl.sum(acc2, axis=0)[None, :]
    if HAS_SCALE:
        acc = acc * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_off = offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptr + y_off, acc, mask=y_mask, sem="relaxed")
    else:
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    if COUNT:  # the layer's achieved-sparsity counters, kept = inputs used, seen = inputs offered
        if pid_n == 0:
            tl.atomic_add(kept_ptr, tl.sum(kept.to(tl.int64), axis=0), sem="relaxed")
            if pid_k == 0:
                tl.atomic_add(seen_ptr, MK.to(tl.int64), sem="relaxed")


def sparse_gemv(x: torch.Tensor, threshold: torch.Tensor, weight_t: torch.Tensor, scale: torch.Tensor | None = None,
                kept: torch.Tensor | None = None, seen: torch.Tensor | None = None,
                config: dict | None = None) -> torch.Tensor:
    """x (M, K), M <= 16; threshold (M,) float32; weight_t (K, N) bf16/fp16/int8 (+ scale (N,) for int8)
    -> (M, N) in x's dtype. Inputs with |x| <= threshold are skipped; the int64 scalars `kept` and `seen`
    (both or neither) accumulate the inputs used and offered."""
    m, k = x.shape
    n = weight_t.shape[1]
    if m > MAX_TOKENS:
        raise ValueError(f"sparse_gemv takes at most {MAX_TOKENS} tokens, got {m}")
    x = x.contiguous()
    block_m = 1 if m == 1 else 16
    if kept is not None and seen is None:
        seen = torch.zeros((), dtype=torch.int64, device=x.device)

    def launch(cfg, count=False):
        split, block_n, block_k = cfg["split"], cfg["block_n"], cfg["block_k"]
        atomic = split > 1
        y = torch.zeros(m, n, device=x.device, dtype=torch.float32) if atomic else torch.empty(
            m, n, device=x.device, dtype=x.dtype)
        per_prog = triton.cdiv(triton.cdiv(k, block_k), split) * block_k
        grid = (triton.cdiv(n, block_n), triton.cdiv(k, per_prog))
        _sparse_gemv_kernel[grid](x, threshold, weight_t, weight_t if scale is None else scale, y,
                                  kept if count else threshold, seen if count else threshold, m, k, n, m * k, x.stride(0), y.stride(0), per_prog,
                                  HAS_SCALE=scale is not None, COUNT=count, BLOCK_M=block_m, BLOCK_K=block_k,
                                  BLOCK_N=block_n, ATOMIC=atomic, num_warps=cfg["warps"])
        return y.to(x.dtype) if atomic else y

    if config is None:
        sms = sm_count(x.device)
        block_k = 32 if m == 1 else 16
        widths = (128, 256, 512) if weight_t.dtype == torch.int8 else (128, 256)
        candidates = [dict(split=s, block_n=bn, block_k=block_k, warps=4) for bn in widths
                      for s in split_for(triton.cdiv(n, bn), triton.cdiv(k, block_k), sms)]
        config = tuned(("sparse_gemv", weight_t.dtype, m, n, k, x.dtype), candidates, launch)
    return launch(config, count=kept is not None)


@triton.jit
def _gather_gemv_kernel(x_ptr, idx_ptr, cnt_ptr, wt_ptr, s_ptr, y_ptr, kept_ptr, seen_ptr, K, N, PER_PROG,
                        HAS_SCALE: tl.constexpr, COUNT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                        ATOMIC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    count = tl.load(cnt_ptr)
    acc2 = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    p_lo = pid_k * PER_PROG
    for p0 in range(p_lo, p_lo + PER_PROG, BLOCK_K):
        p = p0 + tl.arange(0, BLOCK_K)
        p_mask = p < count
        k = tl.load(idx_ptr + p, mask=p_mask, other=0)
        x = tl.load(x_ptr + k, mask=p_mask, other=0.0).to(tl.float32)
        w = tl.load(wt_ptr + k[:, None] * N + offs_n[None, :], mask=p_mask[:, None] & n_mask[None, :], other=0)
        acc2 += w.to(tl.float32) * x[:, None]
    acc = tl.sum(acc2, axis=0)
    if HAS_SCALE:
        acc = acc * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if ATOMIC:
        tl.atomic_add(y_ptr + offs_n, acc, mask=n_mask, sem="relaxed")
    else:
        tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)
    if COUNT:
        if (pid_n == 0) & (pid_k == 0):
            tl.atomic_add(kept_ptr, count.to(tl.int64), sem="relaxed")
            tl.atomic_add(seen_ptr, K.to(tl.int64), sem="relaxed")


def gather_gemv(x: torch.Tensor, idx: torch.Tensor, count: torch.Tensor, keep: int, weight_t: torch.Tensor,
                scale: torch.Tensor | None = None, kept: torch.Tensor | None = None,
                seen: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """One token: y = W @ x over only the `count` (<= keep) inputs listed in `idx` (from a top-k selection).

    Every loaded weight row is used: the loop length is the kept count, not K, which is what turns
    skipped columns into saved time (the masked-row kernel above still walks all K)."""
    k = x.shape[-1]
    n = weight_t.shape[1]
    x = x.reshape(-1)
    count_stats = kept is not None

    def launch(cfg):
        split, block_n, block_k = cfg["split"], cfg["block_n"], cfg["block_k"]
        atomic = split > 1
        y = torch.zeros(n, device=x.device, dtype=torch.float32) if atomic else torch.empty(
            n, device=x.device, dtype=x.dtype)
        per_prog = triton.cdiv(triton.cdiv(keep, block_k), split) * block_k
        grid = (triton.cdiv(n, block_n), triton.cdiv(keep, per_prog))
        _gather_gemv_kernel[grid](x, idx, count, weight_t, weight_t if scale is None else scale, y,
                                  kept if count_stats else count, seen if count_stats else count, k, n, per_prog,
                                  HAS_SCALE=scale is not None, COUNT=count_stats, BLOCK_K=block_k,
                                  BLOCK_N=block_n, ATOMIC=atomic, num_warps=cfg["warps"],
                                  num_stages=cfg.get("stages", 3))
        return (y.to(x.dtype) if atomic else y)[None]

    if config is None:
        sms = sm_count(x.device)
        widths = (128, 256, 512) if weight_t.dtype == torch.int8 else (64, 128, 256)
        candidates = [dict(split=s, block_n=bn, block_k=bk, warps=4, stages=st) for bn in widths
                      for bk, st in ((32, 2), (32, 4), (64, 3)) for s in split_for(triton.cdiv(n, bn), triton.cdiv(keep, bk), sms)]
        config = tuned(("gather_gemv", weight_t.dtype, keep, n, k, x.dtype), candidates, launch)
    return launch(config)
