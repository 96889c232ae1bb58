"""bf16/fp16 weights, as stored (row-major (N, K): no copy), on the tensor cores for 1-64 tokens, in CUDA C++
(`lowbit_mma.cu`'s `w16_mma`, compiled at first use: `mma_cuda`). The dense path's alternative to cuBLAS at
decode: one launch (cuBLAS adds a split-K reduction kernel to the small projections), no workspace.

    y = launch(x, weight, {"warps": 8, "ahead": 2})      # = x @ weight.T, float32 accumulation
"""
from __future__ import annotations

import torch

from workbench.kernels import mma_cuda


def fits(weight: torch.Tensor) -> bool:
    """Whether this kernel takes `weight`: 2-D bf16/fp16, contiguous rows, K a multiple of 64."""
    return (weight.dim() == 2 and weight.dtype in (torch.bfloat16, torch.float16) and weight.stride(1) == 1
            and weight.stride(0) == weight.shape[1] and weight.shape[1] % 64 == 0 and weight.data_ptr() % 16 == 0)


def candidates(m: int, n: int, k: int) -> list[dict]:
    """Launch configs worth timing (first: the untuned default); a step is a 64-input chunk."""
    return mma_cuda.configs(k // 64, m, (2, 1), (1,))


def launch(x: torch.Tensor, weight: torch.Tensor, cfg: dict, y: torch.Tensor | None = None) -> torch.Tensor:
    return mma_cuda.multiply("w16_mma", x, weight.shape[1], weight.shape[0], [weight], cfg, (weight.dtype,), y)
