"""Weight-only quantized GEMV (decode: 1 to 64 tokens) reading int8 or int4 weights as stored.

One kernel for the formats of `workbench.formats.quant`, on their own packed tensors (no repacking):

* int8, one float32 scale per output row: ``y = (x @ q.T) * scale``;
* int8 with b x b block scales: the K loop steps one block at a time and scales each partial sum;
* int4, groups of g along K (32/64/128/256), two values per byte (even k in the low nibble), fp16
  scales; symmetric ``w = (q - 8) s`` or asymmetric ``w = q s + min``. The zero terms need only the
  per-group sum of x: ``sum_k x_k w_k = s * sum_k x_k q_k + min * sum_k x_k``.

Weights are row-major (N, K) as stored: a program owns BLOCK_N output rows and walks its share of K
(split-K over a second grid axis when N alone gives too few programs; partial sums then meet in a
float32 buffer by atomic adds). One token reduces in registers; 2-64 tokens (a decode batch) use
`tl.dot` with the dequantized tile, 16, 32 or 64 token rows to a tile. Reference: `ops.formats.reference_matmul` (dequantize, then multiply).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from workbench.kernels.tuning import sm_count, split_for, tuned

MAX_TOKENS = 64  # beyond this (prefill) the caller dequantizes and uses cuBLAS


@triton.jit
def _quant_gemv_kernel(x_ptr, q_ptr, s_ptr, m_ptr, y_ptr, M, N, K, stride_xm, stride_ym, stride_sn, stride_sk,
                       K_PER_PROG, BITS: tl.constexpr, GROUP: tl.constexpr, ROWS_PER_SCALE: tl.constexpr,
                       HAS_MIN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    KW: tl.constexpr = BLOCK_K if BITS == 8 else BLOCK_K // 2  # weight columns (bytes) per step
    if BLOCK_M == 1:
        acc2 = tl.zeros([BLOCK_N, KW], dtype=tl.float32)  # reduced once at the end, not every step
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = pid_k * K_PER_PROG
    k_hi = k_lo + K_PER_PROG
    if k_hi > K:
        k_hi = K
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if BITS == 8:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            w = tl.load(q_ptr + offs_n[:, None] * K + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                        other=0).to(tl.float32)
            if GROUP > 0:  # b x b blocks: gather each element's block scale (a few distinct, cached)
                s_off = (offs_n // ROWS_PER_SCALE)[:, None] * stride_sn + (offs_k // GROUP)[None, :] * stride_sk
                w = w * tl.load(s_ptr + s_off, mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0)
            if BLOCK_M == 1:
                acc2 += w * x.to(tl.float32)
            else:
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        else:  # two int4 values per byte: even k in the low nibble, odd k in the high one
            offs_j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            j_mask = offs_j < K // 2
            wmask = n_mask[:, None] & j_mask[None, :]
            packed = tl.load(q_ptr + offs_n[:, None] * (K // 2) + offs_j[None, :], mask=wmask, other=0)
            s_off = offs_n[:, None] * stride_sn + ((2 * offs_j) // GROUP)[None, :] * stride_sk
            s = tl.load(s_ptr + s_off, mask=wmask, other=0.0).to(tl.float32)
            lo = (packed & 0x0F).to(tl.float32)
            hi = ((packed >> 4) & 0x0F).to(tl.float32)
            if HAS_MIN:
                mn = tl.load(m_ptr + s_off, mask=wmask, other=0.0).to(tl.float32)
                lo = lo * s + mn
                hi = hi * s + mn
            else:
                lo = (lo - 8.0) * s
                hi = (hi - 8.0) * s
            xmask = m_mask[:, None] & j_mask[None, :]
            xe = tl.load(x_ptr + offs_m[:, None] * stride_xm + 2 * offs_j[None, :], mask=xmask, other=0.0)
            xo = tl.load(x_ptr + offs_m[:, None] * stride_xm + 2 * offs_j[None, :] + 1, mask=xmask, other=0.0)
            if BLOCK_M == 1:
                acc2 += lo * xe.to(tl.float32) + hi * xo.to(tl.float32)
            else:
                acc += tl.dot(xe, tl.trans(lo.to(xe.dtype))) + tl.dot(xo, tl.trans(hi.to(xo.dtype)))
    if BLOCK_M == 1:
        acc = tl.sum(acc2, axis=1)[None, :]
    if BITS == 8:
        if GROUP == 0:  # int8 per-row scale, applied once
            acc = acc * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_off = offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptr + y_off, acc, mask=y_mask, sem="relaxed")
    else:
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def _layout(tensors: dict, k: int) -> tuple:
    """(bits, group, rows per scale, stride_sn, stride_sk, K step) for a packed weight's tensors."""
    q, scale = tensors["q"], tensors["scale"]
    if q.dtype == torch.int8:
        if scale.dim() == 1:
            return 8, 0, 1, 0, 0, 128
        block = k // scale.shape[1]
        return 8, block, block, scale.stride(0), scale.stride(1), 128
    group = k // scale.shape[1]
    return 4, group, 1, scale.stride(0), scale.stride(1), 256


def launch_candidates(m: int, n: int, k: int, bits: int, device) -> list[dict]:
    """The launch configs the tuner times for an (m x k) @ (k x n) problem (every one is tested)."""
    default_k = 128 if bits == 8 else 256
    if m <= 16:
        shapes = ((16, default_k, 4), (32, default_k, 4), (64, default_k, 8), (16, 2 * default_k, 4),
                  (32, 2 * default_k, 8))
    else:  # 32 or 64 token rows: output tiles of 64+ (narrower ones miscompute for int4 at 64 rows)
        shapes = ((64, default_k // 2, 4), (64, default_k, 8), (128, default_k // 2, 8))
    sms = sm_count(device)
    return [dict(split=s, block_n=bn, block_k=bk, warps=w) for bn, bk, w in shapes
            for s in split_for(triton.cdiv(n, bn), triton.cdiv(k, bk), sms)]


def quant_gemv(x: torch.Tensor, tensors: dict, config: dict | None = None) -> torch.Tensor:
    """x (M, K) with M <= 64, bf16/fp16 -> (M, N) in x's dtype, for int8 / int8-block / int4 tensors.
    `config` None: the tuner's pick among `launch_candidates` (`kernels.quant_paths` adds the others)."""
    q, scale, minimum = tensors["q"], tensors["scale"], tensors.get("min")
    m, k = x.shape
    n = q.shape[0]
    if m > MAX_TOKENS:
        raise ValueError(f"quant_gemv takes at most {MAX_TOKENS} tokens, got {m}")
    x = x.contiguous()
    bits, group, rows_per_scale, ssn, ssk, default_k = _layout(tensors, k)
    block_m = 1 if m == 1 else max(16, triton.next_power_of_2(m))  # tl.dot needs at least 16 rows

    def launch(cfg):
        split, block_n, block_k = cfg["split"], cfg["block_n"], cfg.get("block_k", default_k)
        steps = triton.cdiv(k, block_k)
        atomic = split > 1
        y = torch.zeros(m, n, device=x.device, dtype=torch.float32) if atomic else torch.empty(
            m, n, device=x.device, dtype=x.dtype)
        per_prog = triton.cdiv(steps, split) * block_k
        grid = (triton.cdiv(n, block_n), triton.cdiv(k, per_prog))
        _quant_gemv_kernel[grid](x, q, scale, scale if minimum is None else minimum, y, m, n, k, x.stride(0),
                                 y.stride(0), ssn, ssk, per_prog, BITS=bits, GROUP=group,
                                 ROWS_PER_SCALE=rows_per_scale, HAS_MIN=minimum is not None, BLOCK_M=block_m,
                                 BLOCK_N=block_n, BLOCK_K=block_k, ATOMIC=atomic, num_warps=cfg["warps"])
        return y.to(x.dtype) if atomic else y

    if config is None:
        candidates = launch_candidates(m, n, k, bits, x.device)
        config = tuned(("quant_gemv", bits, group, minimum is not None, m, n, k, x.dtype),
                       candidates, launch)
    return launch(config)
