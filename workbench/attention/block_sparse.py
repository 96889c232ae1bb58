"""Block-sparse decode attention, the torch reference: score blocks with an index cache, attend to the best.

At decode, one new query per sequence attends to a cache of T keys. DeepSeek-V3.2's recipe, at block
granularity (as Quest and paged attention lay the cache out): a small index-key cache (one head of
`d_index` dims, as DSA's indexer keys are one shared head) scores every position with
sum_h w_h * relu(q_h . k_index); a block's score is its best position's; the top `n_blocks` blocks (plus
the first, for the sinks, and the last, for the current token) are attended exactly. These functions are
the reference the Triton kernels in `workbench/kernels/sparse_decode.py` are tested against.
"""
from __future__ import annotations

import torch


def block_scores(q_index: torch.Tensor, head_weights: torch.Tensor, index_keys: torch.Tensor,
                 seq_lens: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, d) queries, (B, H) weights, (B, T, d) index keys -> (B, T/block) block scores (float32).

    Positions at or beyond a sequence's length score -inf; the first and the current block +inf.
    """
    b, t, _ = index_keys.shape
    per_head = torch.relu(torch.matmul(q_index.float(), index_keys.float().transpose(-1, -2)))  # (B, H, T)
    scores = (head_weights.float()[..., None] * per_head).sum(1)  # (B, T)
    pos = torch.arange(t, device=scores.device)
    scores = scores.masked_fill(pos[None, :] >= seq_lens[:, None], float("-inf"))
    blocks = scores.view(b, t // block, block).amax(-1)  # (B, NB)
    blocks[:, 0] = float("inf")
    blocks.scatter_(1, ((seq_lens - 1) // block)[:, None].long(), float("inf"))
    return blocks


def select_blocks(scores: torch.Tensor, n_blocks: int, sort: bool = True) -> torch.Tensor:
    """(B, NB) scores -> (B, n_blocks) int32 block indices (ascending unless sort=False: the kernel
    does not need the order, and skipping the sort saves a launch at decode)."""
    idx = scores.topk(n_blocks, dim=-1, sorted=False).indices
    return (idx.sort(dim=-1).values if sort else idx).to(torch.int32)


def block_sparse_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, blocks: torch.Tensor,
                           seq_lens: torch.Tensor, block: int, scale: float | None = None) -> torch.Tensor:
    """q (B, H, D), keys/values (B, Hkv, T, D), blocks (B, n) -> (B, H, D): exact attention over the blocks."""
    b, h, d = q.shape
    hkv = keys.shape[1]
    scale = scale if scale is not None else d ** -0.5
    pos = (blocks.long()[:, :, None] * block + torch.arange(block, device=q.device)).reshape(b, -1)  # (B, n*blk)
    gather = pos[:, None, :, None].expand(b, hkv, pos.shape[1], d)
    k_sel = keys.gather(2, gather).float()  # (B, Hkv, S, D)
    v_sel = values.gather(2, gather).float()
    qg = q.float().view(b, hkv, h // hkv, d)  # (B, Hkv, G, D)
    s = torch.matmul(qg, k_sel.transpose(-1, -2)) * scale  # (B, Hkv, G, S)
    s = s.masked_fill((pos >= seq_lens[:, None])[:, None, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(s, dim=-1), v_sel)  # (B, Hkv, G, D)
    return out.reshape(b, h, d).to(q.dtype)
