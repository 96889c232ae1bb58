"""Fused kernels for the decode step: what is left of a layer once the weights are read.

A Llama layer at batch 1 is ~48 small launches in eager PyTorch (RMSNorm alone is six); in a CUDA graph
each still costs a few microseconds, and on an 8B model that adds up to milliseconds per token. These
kernels make it about a dozen:

* ``add_rmsnorm``   residual add + RMSNorm in one pass (one program per token), optionally with the
                    per-token top-k cut of its output for the next sparse projections;
* ``silu_mul``      SwiGLU's ``silu(gate) * up``, also with an optional top-k cut;
* ``rope_and_cache``rotary embedding of q and k, and k/v written into their cache slots, in one launch;
* ``radix_cut``     the exact top-k cut of a row in registers: four 8-bit radix passes on the bits of |x|
                    (histograms, no sort), used inside the two above and by `kernels.topk`.

References are HF's modules (LlamaRMSNorm, apply_rotary_pos_emb, the SiLU MLP); the decode tests compare
whole steps against the torch path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from workbench.kernels.pdl import enter, launch_kwargs


@dataclass
class Selection:
    """A top-k choice per token: the cut (M,), the kept indices in ascending order (M, D; the first
    `count` of each row are valid) and the count (M,)."""

    cut: torch.Tensor
    idx: torch.Tensor
    count: torch.Tensor

    @classmethod
    def empty(cls, rows: int, d: int, device) -> "Selection":
        return cls(torch.empty(rows, device=device, dtype=torch.float32),
                   torch.empty(rows, d, device=device, dtype=torch.int32),
                   torch.empty(rows, device=device, dtype=torch.int32))

    def pointers(self):
        return self.cut, self.idx, self.count


@triton.jit
def radix_cut(x, valid, keep, B: tl.constexpr = 8):
    """The value t with exactly `keep` of the valid |x| above it (absent ties): the (n - keep)-th smallest.

    A radix select on the bit patterns of |x| (non-negative floats order like their 31 low int32 bits):
    each pass histograms the next B bits of the values still in the running and keeps the bin holding
    the answer; ceil(31 / B) passes, no sort, no host sync."""
    bits = tl.abs(x.to(tl.float32)).to(tl.int32, bitcast=True)
    n = tl.sum(valid.to(tl.int32), axis=0)
    rank = n - keep  # the answer is the rank-th smallest valid value (1-based)
    prefix = tl.full([], 0, tl.int32)
    bins = tl.arange(0, 1 << B)
    for p in tl.static_range((31 + B - 1) // B):
        top = 31 - B * p  # bits [shift, top) are this pass's digit
        shift = max(top - B, 0)
        cand = valid & ((bits >> top) == (prefix >> top))
        digit = (bits >> shift) & ((1 << (top - shift)) - 1)
        hist = tl.histogram(digit, 1 << B, mask=cand)
        cum = tl.cumsum(hist, axis=0)
        d = tl.sum((cum < rank).to(tl.int32), axis=0)  # the bin holding the rank-th candidate
        rank = rank - tl.sum(tl.where(bins < d, hist, 0), axis=0)
        prefix = prefix | (d << shift)
    cut = prefix.to(tl.float32, bitcast=True)
    return tl.where(keep >= n, -1.0, cut)


def select_bits(block: int) -> int:
    """Radix digit width of `radix_cut` for a row of `block`: measured fastest on an H100 at one token
    (experiments/speed/gemv.json: 2-bit 13.7 us for 4096 entries, 4-bit 33.5 us for 14336)."""
    return 2 if block <= 4096 else 4


SILU_CHUNK = 2048


def warps_for(block: int) -> int:
    return min(32, max(4, block // 512))


@triton.jit
def emit_selection(v, valid, cut, row, D, cut_ptr, idx_ptr, cnt_ptr):
    """Store a row's cut, the ascending indices of its kept entries (|v| > cut) and their count: the
    sparse GEMV then walks only those weight rows."""
    offs = tl.arange(0, v.shape[0])
    kept = (tl.abs(v.to(tl.float32)) > cut) & valid
    slot = tl.cumsum(kept.to(tl.int32), axis=0) - 1
    tl.store(idx_ptr + row * D + slot, offs, mask=kept)
    tl.store(cnt_ptr + row, tl.sum(kept.to(tl.int32), axis=0))
    tl.store(cut_ptr + row, cut)


@triton.jit
def _mask_and_count(v, valid, keep, threshold, nz0, en0, nz1, en1, nz2, en2, CUT: tl.constexpr, NC: tl.constexpr,
                    SB: tl.constexpr):
    """v with the entries at or below the cut zeroed (CUT 1: the row's top-`keep`, 2: |v| > `threshold`),
    and the kept / offered counts added to the consumers' counters (NC of them: the layers that read it)."""
    if CUT == 1:
        cut = radix_cut(v, valid, keep, SB)
    else:
        cut = threshold
    kept = (tl.abs(v.to(tl.float32)) > cut) & valid
    if NC > 0:
        n_kept = tl.sum(kept.to(tl.int64), axis=0)
        n_all = tl.sum(valid.to(tl.int64), axis=0)
        tl.atomic_add(nz0, n_kept, sem="relaxed")
        tl.atomic_add(en0, n_all, sem="relaxed")
        if NC > 1:
            tl.atomic_add(nz1, n_kept, sem="relaxed")
            tl.atomic_add(en1, n_all, sem="relaxed")
        if NC > 2:
            tl.atomic_add(nz2, n_kept, sem="relaxed")
            tl.atomic_add(en2, n_all, sem="relaxed")
    return tl.where(kept, v, 0.0).to(v.dtype)


@triton.jit
def _add_rmsnorm_kernel(x_ptr, d_ptr, w_ptr, out_ptr, h_ptr, D, eps, keep, threshold, nz0, en0, nz1, en1, nz2, en2,
                        HAS_DELTA: tl.constexpr, CUT: tl.constexpr, NC: tl.constexpr, BLOCK: tl.constexpr,
                        SB: tl.constexpr, PDL: tl.constexpr):
    enter(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        x = x + tl.load(d_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
        x = x.to(out_ptr.dtype.element_ty)  # the residual stream is kept in the model's dtype, as in HF
        tl.store(out_ptr + row * D + offs, x, mask=mask)
        x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = (x * rstd).to(h_ptr.dtype.element_ty).to(tl.float32) * w  # HF casts before scaling by the weight
    h = h.to(h_ptr.dtype.element_ty)
    if CUT > 0:
        h = _mask_and_count(h, mask, keep, threshold, nz0, en0, nz1, en1, nz2, en2, CUT, NC, SB)
    tl.store(h_ptr + row * D + offs, h, mask=mask)


def _cut_args(cut) -> tuple[int, int, float]:
    """(mode, keep, threshold) for a `sparsity.rules.Cut` (top-k or a constant threshold), or None."""
    if cut is None:
        return 0, 0, 0.0
    return (1, cut.keep, 0.0) if cut.kind == "topk" else (2, 0, cut.threshold)


def _counter_args(counters, fallback: torch.Tensor) -> tuple[list, int]:
    """Up to three consumers' (nonzero_seen, entries_seen) int64 counters as six pointers, and how many."""
    if len(counters) > 3:
        raise ValueError("at most three layers count one sparsified input")
    flat = [t for pair in counters for t in pair]
    return flat + [fallback] * (6 - len(flat)), len(counters)


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, cut=None,
                counters=()):
    """(x + delta, h = rmsnorm(x + delta) * weight) for rows (..., D).

    With `cut` (a `Cut`: top-k or a constant threshold, the next projections' sparsity, applied here while
    the row is in registers) h comes sparsified, and each (nonzero_seen, entries_seen) pair of `counters`
    (the layers that read h, at most three) counts the entries kept and offered."""
    d = x.shape[-1]
    rows = x.numel() // d
    out = torch.empty_like(x) if delta is not None else x
    h = torch.empty_like(x)
    mode, keep, threshold = _cut_args(cut)
    ptrs, nc = _counter_args(counters if mode else (), h)
    block = triton.next_power_of_2(d)
    _add_rmsnorm_kernel[(rows,)](x, delta if delta is not None else x, weight, out, h, d, float(eps), keep,
                                 threshold, *ptrs, HAS_DELTA=delta is not None, CUT=mode, NC=nc, BLOCK=block,
                                 SB=select_bits(block), num_warps=warps_for(block), **launch_kwargs(x.device))
    return out, h


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, stride_g, stride_u, D, keep, threshold, nz0, en0, nz1, en1, nz2, en2, CUT: tl.constexpr,
                     NC: tl.constexpr, BLOCK: tl.constexpr, SB: tl.constexpr, PDL: tl.constexpr):
    enter(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    g = tl.load(g_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + offs, mask=mask, other=0.0)
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty)  # HF: silu in the model dtype, then * up
    y = (act.to(tl.float32) * u.to(tl.float32)).to(out_ptr.dtype.element_ty)
    if CUT > 0:
        y = _mask_and_count(y, mask, keep, threshold, nz0, en0, nz1, en1, nz2, en2, CUT, NC, SB)
    tl.store(out_ptr + row * D + offs, y, mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, cut=None, counters=()):
    """silu(gate) * up, sparsified by `cut` and counted into `counters` as in `add_rmsnorm`."""
    d = gate.shape[-1]
    rows = gate.numel() // d
    out = torch.empty_like(gate)
    mode, keep, threshold = _cut_args(cut)
    ptrs, nc = _counter_args(counters if mode else (), out)
    # an elementwise row is cut into chunks (one program for 14336 entries at one token took 2.4 us, several
    # take ~1); exact top-k needs the whole row in one program
    block = triton.next_power_of_2(d) if mode == 1 else min(triton.next_power_of_2(d), SILU_CHUNK)
    gate, up = gate.reshape(rows, d), up.reshape(rows, d)  # views: gate|up may be halves of one output
    if gate.stride(-1) != 1 or up.stride(-1) != 1:
        gate, up = gate.contiguous(), up.contiguous()
    _silu_mul_kernel[(rows, triton.cdiv(d, block))](gate, up, out, gate.stride(0), up.stride(0), d, keep, threshold, *ptrs, CUT=mode, NC=nc, BLOCK=block,
                              SB=select_bits(block), num_warps=warps_for(block), **launch_kwargs(gate.device))
    return out


@triton.jit
def _mask_rows_kernel(x_ptr, out_ptr, D, keep, threshold, nz0, en0, nz1, en1, nz2, en2, CUT: tl.constexpr,
                      NC: tl.constexpr, BLOCK: tl.constexpr, SB: tl.constexpr, PDL: tl.constexpr):
    enter(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    v = tl.load(x_ptr + row * D + offs, mask=mask, other=0.0)
    v = _mask_and_count(v, mask, keep, threshold, nz0, en0, nz1, en1, nz2, en2, CUT, NC, SB)
    tl.store(out_ptr + row * D + offs, v, mask=mask)


def mask_rows(x: torch.Tensor, cut, counters=()) -> torch.Tensor:
    """x (M, D) with each row's entries at or below `cut` zeroed, counted into `counters` as in
    `add_rmsnorm`: one launch where the rule's torch path takes seven (the input of a projection whose
    producer is not one of the fused kernels, e.g. o's attention output)."""
    x = x.contiguous()
    rows, d = x.shape
    out = torch.empty_like(x)
    mode, keep, threshold = _cut_args(cut)
    ptrs, nc = _counter_args(counters, out)
    block = triton.next_power_of_2(d)
    _mask_rows_kernel[(rows,)](x, out, d, keep, threshold, *ptrs, CUT=mode, NC=nc, BLOCK=block,
                               SB=select_bits(block), num_warps=warps_for(block), **launch_kwargs(x.device))
    return out


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, qo_ptr, kc_ptr, vc_ptr, T, stride_q, stride_k,
                       stride_v, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
    enter(PDL)
    s = tl.program_id(0)
    head = tl.program_id(1)  # 0..H-1: query heads; H..H+HKV-1: key/value heads
    half = tl.arange(0, D // 2)
    c1 = tl.load(cos_ptr + s * D + half).to(tl.float32)
    c2 = tl.load(cos_ptr + s * D + D // 2 + half).to(tl.float32)
    s1 = tl.load(sin_ptr + s * D + half).to(tl.float32)
    s2 = tl.load(sin_ptr + s * D + D // 2 + half).to(tl.float32)
    if head < H:
        src = q_ptr + s * stride_q + head * D
        dst = qo_ptr + (s * H + head) * D
    else:
        kvh = head - H
        pos = tl.load(pos_ptr + s)
        src = k_ptr + s * stride_k + kvh * D
        dst = kc_ptr + ((s * HKV + kvh) * T + pos) * D
        full = tl.arange(0, D)
        tl.store(vc_ptr + ((s * HKV + kvh) * T + pos) * D + full, tl.load(v_ptr + s * stride_v + kvh * D + full))
    x1 = tl.load(src + half).to(tl.float32)
    x2 = tl.load(src + D // 2 + half).to(tl.float32)
    tl.store(dst + half, (x1 * c1 - x2 * s1).to(dst.dtype.element_ty))  # rotate_half: (-x2, x1)
    tl.store(dst + D // 2 + half, (x2 * c2 + x1 * s2).to(dst.dtype.element_ty))


def rope_and_cache(q, k, v, cos, sin, positions, k_cache, v_cache):
    """q (S, H, D), k/v (S, Hkv, D), cos/sin (S, D), positions (S,) -> rotated q (S, H, D); rotated k and
    v written at each slot's position of k_cache/v_cache (S, Hkv, T, D)."""
    s, h, d = q.shape
    hkv, t = k_cache.shape[1], k_cache.shape[2]
    # q, k and v may be column slices of one joined q|k|v output: rows strided, each row's heads contiguous
    q, k, v = (a if a.stride(2) == 1 and a.stride(1) == d else a.contiguous() for a in (q, k, v))
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _rope_cache_kernel[(s, h + hkv)](q, k, v, cos, sin, positions, q_out, k_cache, v_cache, t, q.stride(0),
                                     k.stride(0), v.stride(0), H=h, HKV=hkv, D=d, num_warps=1,
                                     **launch_kwargs(q.device))
    return q_out
