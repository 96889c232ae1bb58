"""TEAL-style sparse GEMV: y = W @ hardshrink(x, t) for one token, skipping the weight rows of zeroed inputs.

The weight is stored transposed (K, N) ("column-major W"), so input channel i's weights are one
contiguous row: a masked load of that row fetches nothing when |x_i| <= t, and the bytes read fall with
the sparsity. Split-K over a (N tiles, K tiles) grid; partial sums meet in a float32 buffer by atomic
adds. The threshold is applied in-kernel. Reference: `F.linear(threshold_sparsify(x, t), W)`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sparse_gemv_kernel(x_ptr, wt_ptr, y_ptr, K, N, threshold,
                        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
    keep = (tl.abs(x) > threshold) & (offs_k < K)
    w = tl.load(wt_ptr + offs_k[:, None] * N + offs_n[None, :], mask=keep[:, None] & (offs_n < N)[None, :],
                other=0.0)  # rows of zeroed inputs are never fetched
    acc = tl.sum(w.to(tl.float32) * x[:, None], axis=0)
    tl.atomic_add(y_ptr + offs_n, acc, mask=offs_n < N, sem="relaxed")


def sparse_gemv(x: torch.Tensor, weight_t: torch.Tensor, threshold: float, out: torch.Tensor | None = None,
                block_k: int = 32, block_n: int = 512, num_warps: int = 4) -> torch.Tensor:
    """x (K,) and weight_t (K, N) contiguous -> y (N,) in x's dtype; inputs with |x| <= threshold skipped."""
    k, n = weight_t.shape
    acc = torch.zeros(n, device=x.device, dtype=torch.float32) if out is None else out.zero_()
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _sparse_gemv_kernel[grid](x, weight_t, acc, k, n, float(threshold), BLOCK_K=block_k, BLOCK_N=block_n,
                              num_warps=num_warps)
    return acc.to(x.dtype)
