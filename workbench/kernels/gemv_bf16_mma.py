"""bf16/fp16 weights, as stored (row-major (N, K): no copy), on the tensor cores for 1-64 tokens, in CUDA C++
(`lowbit_mma.cu`'s `w16_mma`, compiled at first use: `mma_cuda`). The dense path's alternative to cuBLAS at
decode: one launch (cuBLAS adds a split-K reduction kernel to the small projections), no workspace.

    y = launch(x, weight, {"warps": 8, "ahead": 2})      # = x @ weight.T, float32 accumulation
"""
from __future__ import annotations

import torch

from workbench.kernels import mma_cuda
from workbench.kernels.gemv_int4_mma import MAX_TOKENS, aligned_rows, token_tiles


def fits(weight: torch.Tensor) -> bool:
    """Whether this kernel takes `weight`: 2-D bf16/fp16, contiguous rows, K a multiple of 64."""
    return (weight.dim() == 2 and weight.dtype in (torch.bfloat16, torch.float16) and weight.stride(1) == 1
            and weight.stride(0) == weight.shape[1] and weight.shape[1] % 64 == 0 and weight.data_ptr() % 16 == 0)


def candidates(m: int, n: int, k: int) -> list[dict]:
    chunks = k // 64
    out = [{"warps": w, "ahead": a} for w in (8, 4, 16) if chunks >= w and w * token_tiles(m) <= 64
           for a in ((2, 1) if token_tiles(m) <= 2 else (1,))]
    return out or [{"warps": 1, "ahead": 1}]


def launch(x: torch.Tensor, weight: torch.Tensor, cfg: dict, y: torch.Tensor | None = None) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    if k != weight.shape[1] or m > MAX_TOKENS or x.dtype != weight.dtype:
        raise ValueError(f"w16_mma takes x (M <= {MAX_TOKENS}, K={weight.shape[1]}) in {weight.dtype}, got "
                         f"{tuple(x.shape)} {x.dtype}")
    x = aligned_rows(x)
    if y is None:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    name = f"w16_mma<{token_tiles(m)}, {cfg['warps']}, {cfg['ahead']}, {'true' if x.dtype == torch.bfloat16 else 'false'}>"
    mma_cuda.launch(name, (-(-n // 16), 1, 1), (32 * cfg["warps"], 1, 1), [x, weight, y, m, n, k], x.device)
    return y
