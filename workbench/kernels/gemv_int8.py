"""int8 weight-only GEMV/GEMM for decode batches (1-64 tokens): y = (x @ q.T) * scale.

Format (`workbench.formats.quant.quantize_int8_channel`): "q" int8 (N, K) row-major, "scale" float32 (N,);
w = q * scale. No repacking: `pack` only checks and makes the tensors contiguous.

One Triton kernel for every batch size. A program owns BLOCK_N output rows and a K range; each step
loads a (BLOCK_N, BLOCK_K) int8 tile (16-byte cp.async, `num_stages` deep in shared memory, so several
tiles are in flight per program), converts it to bf16/fp16 in registers (exact: |q| <= 127) and feeds
`tl.dot` with the token tile as the A operand: (BLOCK_T tokens, BLOCK_K) x (BLOCK_K, BLOCK_N), BLOCK_T =
16/32/64 (16 pads one token: the tensor cores have compute to spare, the bytes are what cost). Up to
32 tokens this is mma.sync with the weight operand in registers; 64 tokens use wgmma. float32
accumulation, the row scale applied once at the end. When N alone gives too few programs, K is split
and the partials meet in a workspace (`layouts.store_tile`: one launch, deterministic).

Reference: `reference` (float64 on upcast inputs).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from workbench.kernels.layouts import sm_count, split_outputs, split_plan, splits_for, store_tile
from workbench.kernels.pdl import enter, launch_kwargs, prefetch_l2

MAX_TOKENS = 64
PREFETCH_STEPS: tl.constexpr = tl.constexpr(4)  # tiles per row prefetched before the launch wait (PDL)


@triton.jit(do_not_specialize=["M", "STEPS", "n_split"])
def _w8_gemv_kernel(x_ptr, q_ptr, s_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, stride_xm, stride_ym, STEPS, n_split,
               BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_WS: tl.constexpr,
               EVEN_K: tl.constexpr, TWO: tl.constexpr, PDL: tl.constexpr):
    """TWO: the BLOCK_T tokens as two halves (two mma.sync dots sharing one converted weight tile)
    instead of one wgmma with the converted tile staged through shared memory."""
    HT: tl.constexpr = BLOCK_T // 2 if TWO else BLOCK_T
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N  # rows past N re-read row n % N (never stored): loads stay unmasked
    offs_h = tl.arange(0, HT)
    offs_kk = tl.arange(0, BLOCK_K)
    k_lo = pid_k * STEPS * BLOCK_K
    n_steps = (K - k_lo + BLOCK_K - 1) // BLOCK_K
    if n_steps > STEPS:
        n_steps = STEPS
    w_ptrs = q_ptr + rn.to(tl.int64)[:, None] * K + (k_lo + offs_kk)[None, :]
    x_ptrs = x_ptr + offs_h[:, None] * stride_xm + (k_lo + offs_kk)[None, :]
    if EVEN_K:  # the first PREFETCH_STEPS tiles of each row into L2 while the previous kernel finishes
        prefetch_l2(q_ptr + rn.to(tl.int64) * K + k_lo, tl.minimum(n_steps, PREFETCH_STEPS) * BLOCK_K, PDL)
    enter(PDL)
    acc = tl.zeros([HT, BLOCK_N], dtype=tl.float32)
    if TWO:
        acc1 = tl.zeros([HT, BLOCK_N], dtype=tl.float32)
    for i in range(0, n_steps):
        k_mask = (k_lo + i * BLOCK_K + offs_kk) < K
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs, mask=(offs_h < M)[:, None], other=0.0)
            if TWO:
                x1 = tl.load(x_ptrs + HT * stride_xm, mask=(offs_h + HT < M)[:, None], other=0.0)
        else:
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0)
            x = tl.load(x_ptrs, mask=(offs_h < M)[:, None] & k_mask[None, :], other=0.0)
            if TWO:
                x1 = tl.load(x_ptrs + HT * stride_xm, mask=(offs_h + HT < M)[:, None] & k_mask[None, :], other=0.0)
        wt = tl.trans(w.to(x_ptr.dtype.element_ty))
        acc = tl.dot(x, wt, acc)
        if TWO:
            acc1 = tl.dot(x1, wt, acc1)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    scale = tl.load(s_ptr + rn)[None, :]
    if TWO:
        full = tl.reshape(tl.permute(tl.join(acc * scale, acc1 * scale), (2, 0, 1)), (BLOCK_T, BLOCK_N))
    else:
        full = acc * scale
    store_tile(full, y_ptr, ws_ptr, lock_ptr, tl.arange(0, BLOCK_T), offs_n, M, N, stride_ym, pid_n, pid_k, n_split,
               USE_WS=USE_WS, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N)


def pack(tensors: dict) -> dict:
    """Our int8 per-channel tensors -> the kernel's (the same tensors, contiguous; nothing is repacked)."""
    q, scale = tensors["q"], tensors["scale"]
    if q.dtype != torch.int8 or q.dim() != 2 or scale.dim() != 1 or scale.shape[0] != q.shape[0]:
        raise ValueError("gemv_int8.pack needs q int8 (N, K) and scale (N,)")
    return {"q": q.contiguous(), "scale": scale.float().contiguous()}


def block_t(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def candidates(m: int, n: int, k: int, device) -> list[dict]:
    """Launch configs worth timing for (m x k) @ (k x n); the first is the untuned default."""
    bt = block_t(m)
    if bt == 16:
        shapes = ((128, 128, 4, 4), (64, 256, 4, 4), (128, 256, 4, 3), (256, 128, 8, 3))
    elif bt == 32:
        shapes = ((128, 128, 4, 4), (64, 256, 4, 4), (256, 128, 8, 3))
    else:  # (block_n, block_k, warps, stages[, two halves])
        shapes = ((128, 128, 4, 3), (64, 128, 4, 4), (128, 64, 4, 4))  # (..., True): two halves, slower (SASS: spills)
    sms = sm_count(device)
    out = []
    for bn, bk, w, s, *two in shapes:
        tiles, steps = triton.cdiv(n, bn), triton.cdiv(k, bk)
        sp = splits_for(tiles, steps, sms)
        # default split first: about 2 programs per SM
        sp.sort(key=lambda s_: abs(tiles * s_ - 2 * sms))
        extra = dict(two=True) if two else {}
        out += [dict(block_n=bn, block_k=bk, warps=w, stages=s, split=s_, **extra) for s_ in sp]
    return out


def launch(x: torch.Tensor, packed: dict, cfg: dict, y: torch.Tensor | None = None) -> torch.Tensor:
    q, scale = packed["q"], packed["scale"]
    m, k = x.shape
    n = q.shape[0]
    bt, bn, bk = block_t(m), cfg["block_n"], cfg["block_k"]
    steps, n_split = split_plan(triton.cdiv(k, bk), cfg["split"])
    tiles = triton.cdiv(n, bn)
    y, ws, lk, use_ws = split_outputs(x, m, n, tiles, n_split, bt, bn, y)
    _w8_gemv_kernel[(tiles, n_split)](x, q, scale, y, ws, lk, m, n, k, x.stride(0), y.stride(0), steps, n_split,
                                 BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=bk, USE_WS=use_ws, EVEN_K=k % bk == 0,
                                 TWO=bool(cfg.get("two")) and bt >= 32,  # halves of >= 16 tokens
                                 num_warps=cfg["warps"], num_stages=cfg["stages"], **launch_kwargs(x.device))
    return y


def gemv(x: torch.Tensor, packed: dict, config: dict | None = None) -> torch.Tensor:
    """x (M, K) bf16/fp16, M <= 64 -> (M, N) in x's dtype: (x @ q.T) * scale (float32 accumulation).

    `config` None: the tuner's pick (timed once per shape, `workbench.kernels.tuning.tuned`; the first
    candidate with WORKBENCH_TUNE=0)."""
    if x.dim() != 2 or x.shape[0] > MAX_TOKENS or x.shape[1] != packed["q"].shape[1]:
        raise ValueError(f"gemv_int8 takes x (M <= {MAX_TOKENS}, K={packed['q'].shape[1]}), got {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError("gemv_int8 takes bf16/fp16 activations")
    x = x if x.stride(1) == 1 else x.contiguous()
    if config is None:
        m, k = x.shape
        n = packed["q"].shape[0]
        cands = candidates(m, n, k, x.device)
        if os.environ.get("WORKBENCH_TUNE", "1") == "0":
            config = cands[0]
        else:
            from workbench.kernels.tuning import tuned
            config = tuned(("gemv_int8", block_t(m), m, n, k, x.dtype), cands, lambda c: launch(x, packed, c))
    return launch(x, packed, config)


def reference(x: torch.Tensor, tensors: dict) -> torch.Tensor:
    """float64 (x @ q.T) * scale, returned as float32."""
    return ((x.double() @ tensors["q"].double().T) * tensors["scale"].double()[None, :]).float()
