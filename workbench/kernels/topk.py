"""Per-token top-k cut in one launch: the threshold t with exactly `keep` entries of |x| above it.

A radix select on the bit patterns of |x| (`decode_ops.radix_cut`: four 8-bit histogram passes over
the row held in registers); no sort, no host sync, so it lives inside a CUDA graph. With ties at the
cut fewer than `keep` entries pass (the CPU rule breaks ties exactly; real activations essentially never
tie). Reference: `kthvalue(|x|, D - keep)`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from workbench.kernels.decode_ops import Selection, emit_selection, radix_cut, select_bits, warps_for


@triton.jit
def _topk_threshold_kernel(x_ptr, t_ptr, idx_ptr, cnt_ptr, D, stride, keep, BLOCK: tl.constexpr, SB: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + row * stride + offs, mask=mask, other=0.0)
    emit_selection(x, mask, radix_cut(x, mask, keep, SB), row, D, t_ptr, idx_ptr, cnt_ptr)


def topk_select(x: torch.Tensor, keep: int, bits: int | None = None) -> Selection:
    """x (M, D) -> the per-row top-`keep` Selection (cut, kept indices, count)."""
    m, d = x.shape
    sel = Selection.empty(m, d, x.device)
    block = triton.next_power_of_2(d)
    _topk_threshold_kernel[(m,)](x, *sel.pointers(), d, x.stride(0), keep, BLOCK=block, SB=bits or select_bits(block),
                                 num_warps=warps_for(block))
    return sel


def topk_threshold(x: torch.Tensor, keep: int) -> torch.Tensor:
    """x (M, D) -> (M,) float32 cuts: |x| > cut keeps `keep` entries per row (all of them if keep >= D)."""
    return topk_select(x, keep).cut
