"""Shared pieces of the standalone GEMV kernels (`gemv_int8`, `gemv_int4`, `gemv_sparse`).

* `repack_int4_g` / `unpack_int4_g`: our int4 format (even k in the low nibble) <-> the kernel layout, in
  which byte j of a group of g values holds k = j in its low nibble and k = j + g/2 in its high nibble, so a
  group's low nibbles are its first g/2 inputs and its high nibbles the last g/2, both contiguous in x.
  Same bytes, same place: only the nibbles of each row's own group move.
* Split-K without atomics on the output: each program of a split writes its float32 partial tile to a
  workspace, takes a ticket from a per-tile counter (acq_rel), and the last one to arrive sums the
  partials in a fixed order (deterministic), writes y and resets the counter for the next call. One
  launch, no zeroing kernel, no cast kernel; graph-safe once the workspace exists (the first call on a
  device allocates it: make that call before capturing a CUDA graph).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from workbench.kernels.tuning import capturing


# ---- int4 nibble layout -----------------------------------------------------------------------------------------
def repack_int4_g(q: torch.Tensor, group: int) -> torch.Tensor:
    """(N, K/2) uint8, even k low nibble -> (N, K/2) uint8, per group: low nibble k=j, high nibble k=j+g/2."""
    n, kb = q.shape
    k = 2 * kb
    half = group // 2
    v = torch.stack((q & 0x0F, q >> 4), dim=-1).reshape(n, k // group, group)  # values in k order
    lo, hi = v[..., :half], v[..., half:]
    return (lo | (hi << 4)).reshape(n, kb).contiguous()


def unpack_int4_g(qp: torch.Tensor, group: int) -> torch.Tensor:
    """Kernel layout -> (N, K) uint8 values in k order (the inverse of `repack_int4_g`, unpacked)."""
    n, kb = qp.shape
    k = 2 * kb
    half = group // 2
    g = qp.reshape(n, k // group, half)
    return torch.cat((g & 0x0F, g >> 4), dim=-1).reshape(n, k)


def quarter_pack(q: torch.Tensor, group: int) -> torch.Tensor:
    """(N, K/2) uint8, even k low nibble -> (N, K/4) int16, per group of g: element j holds the nibbles of
    k = j, j + g/4, j + g/2, j + 3g/4 at bits 0, 4, 8, 12 (the weight-as-A kernel's layout; same bytes)."""
    n, kb = q.shape
    k = 2 * kb
    quarter = group // 4
    v = torch.stack((q & 0x0F, q >> 4), dim=-1).reshape(n, k // group, 4, quarter).to(torch.int32)
    word = v[:, :, 0] | (v[:, :, 1] << 4) | (v[:, :, 2] << 8) | (v[:, :, 3] << 12)  # 0..65535
    return torch.where(word >= 32768, word - 65536, word).to(torch.int16).reshape(n, k // 4).contiguous()


def quarter_unpack(qq: torch.Tensor, group: int) -> torch.Tensor:
    """The inverse of `quarter_pack`, unpacked: (N, K) uint8 values in k order."""
    n, kq = qq.shape
    k = 4 * kq
    w = qq.to(torch.int32).reshape(n, k // group, 1, group // 4) & 0xFFFF
    return ((w >> torch.tensor([0, 4, 8, 12], dtype=torch.int32, device=qq.device).reshape(1, 1, 4, 1)) & 0x0F).to(torch.uint8).reshape(n, k)


# ---- split-K workspace ------------------------------------------------------------------------------------------
_WS: dict = {}
_LOCKS: dict = {}
_RETIRED: list = []
MAX_TILES = 1 << 16


def workspace(device: torch.device, numel: int) -> torch.Tensor:
    """A float32 scratch buffer of at least `numel` elements on `device` (grown, never shrunk)."""
    key = torch.device(device).index if torch.device(device).type == "cuda" else str(device)
    buf = _WS.get(key)
    if buf is None or buf.numel() < numel:
        if capturing():
            raise RuntimeError("gemv split-K workspace must be allocated before CUDA-graph capture: call once first")
        if buf is not None:  # a graph captured earlier may still point at it: keep it alive
            _RETIRED.append(buf)
        buf = torch.empty(max(numel, 1 << 20), dtype=torch.float32, device=device)
        _WS[key] = buf
    return buf


def locks(device: torch.device, tiles: int) -> torch.Tensor:
    """Per-output-tile int32 arrival counters, all zero between launches (each launch resets what it used)."""
    if tiles > MAX_TILES:
        raise ValueError(f"too many output tiles for split-K ({tiles})")
    key = torch.device(device).index if torch.device(device).type == "cuda" else str(device)
    buf = _LOCKS.get(key)
    if buf is None:
        if capturing():
            raise RuntimeError("gemv split-K counters must be allocated before CUDA-graph capture: call once first")
        buf = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
        _LOCKS[key] = buf
    return buf


def split_outputs(x: torch.Tensor, m: int, n: int, tiles: int, n_split: int, rows: int, block_n: int,
                  y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(y, workspace, locks, use_ws) for a launch of `tiles` x `n_split` programs writing (m, n) through
    `store_tile` with (rows, block_n) tiles: without a split the workspace and locks are unused (y stands in)."""
    if y is None:
        y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    use_ws = n_split > 1
    if not use_ws:
        return y, y, y, False
    return y, workspace(x.device, tiles * n_split * rows * block_n), locks(x.device, tiles), True


@triton.jit
def store_tile(acc, y_ptr, ws_ptr, lock_ptr, offs_t, offs_n, M, N, stride_ym, pid_n, pid_k, n_split,
               USE_WS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """Write acc (BLOCK_T tokens x BLOCK_N outputs, float32) to y[t, n]; with USE_WS the `n_split`
    programs of one output tile meet in the workspace and the last to arrive writes the sum."""
    t_mask = offs_t < M
    y_mask = t_mask[:, None] & (offs_n < N)[None, :]
    y_off = offs_t[:, None] * stride_ym + offs_n[None, :]
    if USE_WS:
        local = offs_t[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        base = pid_n * n_split
        tl.store(ws_ptr + (base + pid_k).to(tl.int64) * (BLOCK_T * BLOCK_N) + local, acc, mask=t_mask[:, None])
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken
        ticket = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == n_split - 1:
            tot = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
            for s in range(0, n_split):
                tot += tl.load(ws_ptr + (base + s).to(tl.int64) * (BLOCK_T * BLOCK_N) + local,
                               mask=t_mask[:, None], other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + y_off, tot.to(y_ptr.dtype.element_ty), mask=y_mask)
            tl.atomic_xchg(lock_ptr + pid_n, 0, sem="relaxed", scope="gpu")
    else:
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def splits_for(n_tiles: int, k_steps: int, sms: int) -> list[int]:
    """Split-K factors worth trying: grids that fill 1 to 6 programs per SM without spilling into a
    partial extra wave (n_tiles * split just under a multiple of the SM count), and no split smaller
    than 2 K steps."""
    out = {1}
    for per_sm in (1, 2, 3, 4, 6):
        s = (per_sm * sms) // n_tiles
        if s >= 1:
            out.add(max(1, min(k_steps // 2, s)))
    return sorted(out)


def split_plan(k_steps: int, split: int) -> tuple[int, int]:
    """(steps per split, number of splits actually launched) so that no split is empty."""
    split = max(1, min(split, k_steps))
    per = -(-k_steps // split)
    return per, -(-k_steps // per)


def sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if torch.cuda.is_available() else 1
