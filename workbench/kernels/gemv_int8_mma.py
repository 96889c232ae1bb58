"""int8 weights (a float32 scale per row) on the tensor cores for 1-64 tokens, in CUDA C++ (`lowbit_mma.cu`'s
`w8_mma`, compiled at first use: `mma_cuda`).

    layout = pack(tensors)              # once: q + 128 as bytes in the MMA's register order
    y = launch(x, layout, {"warps": 8, "ahead": 4})

Same bytes as the stored weight (N * K, rows padded to 16, + the row scales). Exact products q * x in
float32, the row scale applied once at the end, as the reference `gemv_int8.reference`. K a multiple of 32.
"""
from __future__ import annotations

import torch

from workbench.kernels import mma_cuda
from workbench.kernels.mma_cuda import TILE


def fits(tensors: dict) -> bool:
    """Whether `tensors` (our int8 format) is one this kernel takes: row scales, K a multiple of 32."""
    return tensors["scale"].dim() == 1 and tensors["q"].shape[1] % 32 == 0


def pack(tensors: dict) -> dict:
    """"wp" int32 (tiles, K/32, 32 lanes, 4 words): lane 4g + t's word 2j + h2 holds, for rows g, g + 8 of
    the tile, u = q + 128 at inputs 8t + 4j + 2 h2 + (0, 1) as bytes (row g: +0, +1; row g+8: +0, +1)."""
    q, scale = tensors["q"], tensors["scale"].float()
    n, k = q.shape
    pad = (-n) % TILE
    u = (q.to(torch.int16) + 128).to(torch.uint8)
    if pad:
        u = torch.cat([u, u.new_full((pad, k), 128)])
    scale = torch.cat([scale, scale.new_zeros(pad)]) if pad else scale
    tiles = (n + pad) // TILE
    v = u.reshape(tiles, 2, 8, k // 32, 4, 2, 2, 2)  # (T, h, g, C, t, j, h2, e): input 32C + 8t + 4j + 2h2 + e
    wp = v.permute(0, 3, 2, 4, 5, 6, 1, 7).contiguous()  # (T, C, g, t, j, h2, h, e): bytes of lane 4g + t
    return {"wp": wp.reshape(tiles, k // 32, 32, 16).view(torch.int32), "scale": scale.contiguous(), "n": n, "k": k}


def unpack(layout: dict) -> torch.Tensor:
    """`pack`'s inverse: q (N, K) int8 (for tests)."""
    wp, n, k = layout["wp"], layout["n"], layout["k"]
    tiles = wp.shape[0]
    v = wp.contiguous().view(torch.uint8).reshape(tiles, k // 32, 8, 4, 2, 2, 2, 2)  # (T, C, g, t, j, h2, h, e)
    u = v.permute(0, 6, 2, 1, 3, 4, 5, 7).reshape(tiles * TILE, k)[:n]
    return (u.to(torch.int16) - 128).to(torch.int8)


def candidates(m: int, n: int, k: int) -> list[dict]:
    """Launch configs worth timing (first: the untuned default); a step is a 32-input chunk."""
    return mma_cuda.configs(k // 32, m, (4, 2), (2, 1), row_tiles=True)


def launch(x: torch.Tensor, layout: dict, cfg: dict, y: torch.Tensor | None = None) -> torch.Tensor:
    """y (M, N) = x (M, K) @ (q * scale).T for M <= 64 tokens, in x's dtype."""
    return mma_cuda.multiply("w8_mma", x, layout["k"], layout["n"], [layout["wp"], layout["scale"]], cfg,
                             (torch.bfloat16, torch.float16), y, row_tiles=True)
