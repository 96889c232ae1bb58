"""int4 weights on the tensor cores for 1-64 tokens, in CUDA C++ (`lowbit_mma.cu`'s `w4_mma`, compiled at first
use: `mma_cuda`).

    layout = pack(tensors)              # once: our symmetric int4 format re-laid out in MMA register order
    y = launch(x, layout, {"warps": 8, "ahead": 4})

Same bytes as the stored weight (N * K / 2 + 2 * N * K / g; rows padded to 16). The math: the integer
weights q - 8 times x, exact in each group's float32 partial, scaled by the fp16 scale in float32 (as the
float32 reference `gemv_int4.reference`). Offered for symmetric weights with groups of 64 or 128, K a
multiple of 64, bf16 or fp16 activations, on GPUs with `mma.sync` m16n8k16 (sm_80 and later).

Why a second int4 kernel beside `gemv_int4` (Triton): at one token both ours and aten's tinygemm read int4
weights at 1.1-1.8 TB/s on the H200, a third of the copy bandwidth; see the `.cu` file for the design.
"""
from __future__ import annotations

import torch

from workbench.kernels import mma_cuda

GROUPS = (64, 128)
TILE = mma_cuda.TILE
# bit position of each of a word's 8 nibbles: [physical input offset e (0..3)][row half h (0: row g, 1: g+8)]
SHIFTS = ((0, 4), (16, 20), (8, 12), (24, 28))


def fits(tensors: dict) -> bool:
    """Whether `tensors` (our int4 format) is a weight this kernel takes: symmetric, group 64/128 dividing K."""
    q, scale = tensors["q"], tensors["scale"]
    if "min" in tensors or scale.dim() != 2:
        return False
    k = q.shape[1] * 2
    group = k // scale.shape[1]
    return group in GROUPS and k % 64 == 0 and k % group == 0


def pack(tensors: dict) -> dict:
    """Our int4 tensors ("q" uint8 (N, K/2), even k in the low nibble; "scale" fp16 (N, K/g)) in the
    kernel's order: "wp" int32 (tiles, K/64, 32 lanes, 4 words), "sp" int32 (tiles, K/g, 8) holding the
    fp16 scales of rows g and g + 8 of a tile. Rows are padded to a multiple of 16 (q = 8, scale 0)."""
    q, scale = tensors["q"], tensors["scale"]
    n, k = q.shape[0], q.shape[1] * 2
    group = k // scale.shape[1]
    nib = torch.stack([q & 0xF, q >> 4], dim=-1).reshape(n, k)  # (N, K), values 0..15
    pad = (-n) % TILE
    if pad:
        nib = torch.cat([nib, nib.new_full((pad, k), 8)])
        scale = torch.cat([scale, scale.new_zeros((pad, scale.shape[1]))])
    tiles = (n + pad) // TILE
    shifts = torch.tensor(SHIFTS, dtype=torch.int64, device=q.device).T[None, :, None, None, None, None, :]
    wp = torch.empty((tiles, k // 64, 32, 4), dtype=torch.int32, device=q.device)
    for t0 in range(0, tiles, 256):  # 4096 rows at a time: the int64 words of a 128k-row head would be GBs
        part = nib[t0 * TILE:(t0 + 256) * TILE]
        # rows 16 T + 8 h + g; inputs 64 C + 16 t + 4 j + e
        v = part.to(torch.int64).reshape(-1, 2, 8, k // 64, 4, 4, 4)  # (T, h, g, C, t, j, e)
        words = (v << shifts).sum(dim=(1, 6))  # (T, g, C, t, j): disjoint bits, the sum is an OR
        words = words.permute(0, 2, 1, 3, 4).reshape(-1, k // 64, 32, 4)  # lane = 4 g + t
        wp[t0:t0 + 256] = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    sc = scale.to(torch.float16).reshape(tiles, 2, 8, k // group).permute(0, 3, 2, 1).contiguous()  # (T, G, g, h)
    sp = sc.view(torch.int32).reshape(tiles, k // group, 8)
    return {"wp": wp, "sp": sp.contiguous(), "n": n, "k": k, "group": group}


def unpack(layout: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`pack`'s inverse: the nibbles (N, K) uint8 and the scales (N, K/g) fp16 (for tests)."""
    wp, sp, n, k, group = layout["wp"], layout["sp"], layout["n"], layout["k"], layout["group"]
    tiles = wp.shape[0]
    words = wp.to(torch.int64) & 0xFFFFFFFF  # (T, C, lane, j)
    words = words.reshape(tiles, k // 64, 8, 4, 4).permute(0, 2, 1, 3, 4)  # (T, g, C, t, j)
    shifts = torch.tensor(SHIFTS, dtype=torch.int64, device=wp.device).T  # (h, e)
    v = (words[:, None, :, :, :, :, None] >> shifts[None, :, None, None, None, None, :]) & 0xF  # (T,h,g,C,t,j,e)
    nib = v.reshape(tiles * TILE, k).to(torch.uint8)[:n]
    sc = sp.contiguous().view(torch.float16).reshape(tiles, k // group, 8, 2).permute(0, 3, 2, 1)  # (T, h, g, G)
    return nib, sc.reshape(tiles * TILE, k // group)[:n]


def candidates(m: int, n: int, k: int, group: int) -> list[dict]:
    """Launch configs worth timing (first: the untuned default); a step is one group."""
    return mma_cuda.configs(k // group, m, (4, 2), (2, 1), row_tiles=True, row_cost=group // 64)


def launch(x: torch.Tensor, layout: dict, cfg: dict, y: torch.Tensor | None = None) -> torch.Tensor:
    """y (M, N) = x (M, K) @ dequantize(W).T for M <= 64 tokens, in x's dtype."""
    return mma_cuda.multiply("w4_mma", x, layout["k"], layout["n"], [layout["wp"], layout["sp"]], cfg,
                             (torch.bfloat16, torch.float16), y, params=(layout["group"] // 64,),
                             row_tiles=True)
