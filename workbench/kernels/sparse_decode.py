"""Triton kernels for block-sparse decode attention (reference: workbench/attention/block_sparse.py).

`index_block_scores`: one program per (sequence, block) reads that block's index keys once, computes
sum_h w_h relu(q_h . k) for all heads with one tensor-core dot, and keeps the block maximum: the whole
index cache is read exactly once, nothing else is written.

`block_sparse_attention`: split-K flash decoding over the selected blocks read in place (no gathered
copies): one program per (sequence, KV head, split) handles the query heads of its group against its
share of the blocks with an online softmax; a second small kernel merges the splits by log-sum-exp.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from workbench.kernels.pdl import enter, launch_kwargs


@triton.jit
def _index_scores_kernel(q_ptr, w_ptr, k_ptr, len_ptr, out_ptr, T, NB,
                         H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    enter(PDL)
    b = tl.program_id(0)
    j = tl.program_id(1)
    heads = tl.arange(0, H)
    dims = tl.arange(0, D)
    keys = j * BLOCK + tl.arange(0, BLOCK)
    q = tl.load(q_ptr + b * H * D + heads[:, None] * D + dims[None, :])  # (H, D)
    k = tl.load(k_ptr + b * T * D + keys[:, None] * D + dims[None, :])  # (BLOCK, D)
    w = tl.load(w_ptr + b * H + heads).to(tl.float32)  # (H,)
    s = tl.dot(q, tl.trans(k))  # (H, BLOCK) float32
    s = tl.maximum(s, 0.0) * w[:, None]
    per_key = tl.sum(s, axis=0)  # (BLOCK,)
    n = tl.load(len_ptr + b)
    per_key = tl.where(keys < n, per_key, float("-inf"))
    best = tl.max(per_key, axis=0)
    last = (n - 1) // BLOCK
    best = tl.where((j == 0) | (j == last), float("inf"), best)
    tl.store(out_ptr + b * NB + j, best)


def index_block_scores(q_index, head_weights, index_keys, seq_lens, block: int) -> torch.Tensor:
    """Same contract as ops.sparse_decode.block_scores: (B, H, d), (B, H), (B, T, d) -> (B, T/block)."""
    b, h, d = q_index.shape
    t = index_keys.shape[1]
    nb = t // block
    out = torch.empty(b, nb, device=q_index.device, dtype=torch.float32)
    _index_scores_kernel[(b, nb)](q_index.contiguous(), head_weights.contiguous(), index_keys.contiguous(),
                                  seq_lens.contiguous(), out, t, nb, H=h, D=d, BLOCK=block, num_warps=4,
                                  **launch_kwargs(q_index.device))
    return out


@triton.jit
def _sparse_decode_kernel(q_ptr, k_ptr, v_ptr, blk_ptr, len_ptr, acc_ptr, m_ptr, l_ptr, out_ptr,
                          T, N_SEL, PER_SPLIT, scale, threshold, nz_ptr, en_ptr,
                          HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                          BLOCK: tl.constexpr, SPLITS: tl.constexpr, DENSE: tl.constexpr, CUT: tl.constexpr,
                          COUNT: tl.constexpr, PDL: tl.constexpr):
    """DENSE: every block up to the sequence's own length (no block list; the splits share the blocks
    the sequence has, not the cache's capacity). SPLITS == 1: the normalised output is written directly
    (no merge kernel), with CUT sparsified for the next projection as in `_store_output`."""
    enter(PDL)
    bh = tl.program_id(0)  # sequence * HKV + kv head
    split = tl.program_id(1)
    b = bh // HKV
    kvh = bh % HKV
    g = tl.arange(0, GP)
    dims = tl.arange(0, D)
    gmask = g < G
    q = tl.load(q_ptr + (b * HKV * G + kvh * G + g[:, None]) * D + dims[None, :], mask=gmask[:, None], other=0.0)
    n = tl.load(len_ptr + b)
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    base = (b * HKV + kvh) * T * D
    if DENSE:
        n_blk = (n + BLOCK - 1) // BLOCK
        per = (n_blk + SPLITS - 1) // SPLITS
        lo = split * per
        hi = tl.minimum(lo + per, n_blk)
    else:
        lo = split * PER_SPLIT
        hi = tl.minimum((split + 1) * PER_SPLIT, N_SEL)
    for i in range(lo, hi):
        if DENSE:
            blk = i
        else:
            blk = tl.load(blk_ptr + b * N_SEL + i)
        pos = blk * BLOCK + tl.arange(0, BLOCK)
        k = tl.load(k_ptr + base + pos[:, None] * D + dims[None, :])  # (BLOCK, D), read in place
        v = tl.load(v_ptr + base + pos[:, None] * D + dims[None, :])
        s = tl.dot(q, tl.trans(k)) * scale  # (GP, BLOCK)
        s = tl.where((pos < n)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block past the sequence end: all -inf
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if SPLITS == 1:
        _store_output(acc / l_i[:, None], out_ptr, bh, g, dims, gmask, threshold, nz_ptr, en_ptr, G, D, CUT, COUNT)
    else:
        row = ((bh * SPLITS + split) * GP + g)
        tl.store(acc_ptr + row[:, None] * D + dims[None, :], acc)
        tl.store(m_ptr + row, m_i)
        tl.store(l_ptr + row, l_i)


def block_sparse_attention(q, keys, values, blocks, seq_lens, block: int, scale: float | None = None,
                           splits: int = 8, threshold: float | None = None, counters=None) -> torch.Tensor:
    """Same contract as ops.sparse_decode.block_sparse_attention; keys/values (B, Hkv, T, D) contiguous.
    `blocks` None: dense attention over each sequence's own blocks (`dense_decode_attention`).
    `threshold`: the output comes sparsified, |out| > threshold kept (the o projection's calibrated cut),
    counted into `counters` (nonzero_seen, entries_seen) if given."""
    b, h, d = q.shape
    hkv, t = keys.shape[1], keys.shape[2]
    g = h // hkv
    gp = max(16, triton.next_power_of_2(g))  # tensor-core dots need at least 16 rows
    dense = blocks is None
    n_sel = t // block if dense else blocks.shape[1]
    splits = max(1, min(splits, n_sel))
    per_split = -(-n_sel // splits)
    scale = scale if scale is not None else d ** -0.5
    out = torch.empty(b, h, d, device=q.device, dtype=q.dtype)
    parts = b * hkv * splits * gp if splits > 1 else 1
    acc = torch.empty(parts, d, device=q.device, dtype=torch.float32)
    m = torch.empty(parts, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    cut = dict(CUT=threshold is not None, COUNT=counters is not None)
    nz, en = counters if counters is not None else (m, m)
    t_arg = float(threshold) if threshold is not None else 0.0
    _sparse_decode_kernel[(b * hkv, splits)](q.contiguous(), keys, values, seq_lens if dense else blocks.contiguous(),
                                             seq_lens.contiguous(), acc, m, l, out, t, n_sel, per_split, scale,
                                             t_arg, nz, en, HKV=hkv, G=g, GP=gp, D=d, BLOCK=block, SPLITS=splits,
                                             DENSE=dense, **cut, num_warps=4, **launch_kwargs(q.device))
    if splits > 1:
        _merge_splits_kernel[(b * hkv,)](acc, m, l, out, t_arg, nz, en, G=g, GP=gp, D=d, SPLITS=splits, **cut,
                                         num_warps=4, **launch_kwargs(q.device))
    return out


def dense_splits(capacity: int, block: int) -> int:
    """Splits for dense decode attention over a cache of `capacity` positions: one (no merge kernel) up
    to 8 blocks, then one more per 8 blocks, at most 8. Static per cache, so a captured graph keeps it;
    each split takes its share of the blocks a sequence has at the time."""
    return max(1, min(8, capacity // block // 8))


def dense_decode_attention(q, keys, values, seq_lens, block: int, scale: float | None = None,
                           threshold: float | None = None, counters=None) -> torch.Tensor:
    """Decode attention of q (B, H, D) over each sequence's first seq_lens[b] cached keys/values (with
    `threshold` / `counters` as in `block_sparse_attention`)."""
    return block_sparse_attention(q, keys, values, None, seq_lens, block, scale,
                                  splits=dense_splits(keys.shape[2], block), threshold=threshold, counters=counters)


@triton.jit
def _merge_splits_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, threshold, nz_ptr, en_ptr, G: tl.constexpr,
                         GP: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, CUT: tl.constexpr,
                         COUNT: tl.constexpr, PDL: tl.constexpr):
    """Combine the splits' partial softmaxes by log-sum-exp; write the G query heads of one KV head."""
    enter(PDL)
    bh = tl.program_id(0)
    g = tl.arange(0, GP)
    dims = tl.arange(0, D)
    m_all = tl.full((GP,), float("-inf"), tl.float32)
    for sp in range(SPLITS):
        m_all = tl.maximum(m_all, tl.load(m_ptr + (bh * SPLITS + sp) * GP + g))
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    num = tl.zeros((GP, D), tl.float32)
    den = tl.zeros((GP,), tl.float32)
    for sp in range(SPLITS):
        row = (bh * SPLITS + sp) * GP + g
        w = tl.exp(tl.load(m_ptr + row) - m_safe)
        num += tl.load(acc_ptr + row[:, None] * D + dims[None, :]) * w[:, None]
        den += tl.load(l_ptr + row) * w
    _store_output(num / den[:, None], out_ptr, bh, g, dims, g < G, threshold, nz_ptr, en_ptr, G, D, CUT, COUNT)


@triton.jit
def _store_output(out, out_ptr, bh, g, dims, gmask, threshold, nz_ptr, en_ptr, G: tl.constexpr, D: tl.constexpr,
                  CUT: tl.constexpr, COUNT: tl.constexpr):
    """Write one KV head's G query-head outputs in the model dtype; with CUT, entries with |out| at or
    below `threshold` are zeroed (the o projection's calibrated cut, applied to the rounded value as the
    reference rule does) and, with COUNT, the kept / offered entries added to its counters."""
    v = out.to(out_ptr.dtype.element_ty)
    valid = gmask[:, None] & (dims[None, :] < D)
    if CUT:
        kept = (tl.abs(v.to(tl.float32)) > threshold) & valid
        v = tl.where(kept, v, 0.0).to(out_ptr.dtype.element_ty)
        if COUNT:
            tl.atomic_add(nz_ptr, tl.sum(tl.sum(kept.to(tl.int64), axis=1), axis=0), sem="relaxed")
            tl.atomic_add(en_ptr, tl.sum(tl.sum(valid.to(tl.int64), axis=1), axis=0), sem="relaxed")
    tl.store(out_ptr + (bh * G + g[:, None]) * D + dims[None, :], v, mask=valid)
