"""GPU decode-attention step: dense SDPA against indexer selection + gather + attend, one layer.

    python experiments/sparse_attention/decode_speed.py [--contexts 8192,32768] [--k 2048] [--out FILE]

A Llama-3-8B-shaped attention layer (32 query heads, 8 KV heads, head dim 128, bf16), batch 1 and 8,
one new token against a KV cache of each context length. The sparse step is what a DeepSeek-V3.2-style
engine does at decode: score every cached key with a small index-key cache (here 32 dims per KV head,
bf16: DeepSeek keeps its indexer keys separately in fp8), take the top-k positions shared by all heads
(one per sequence), gather those K/V rows, and attend over them. Both paths are captured in CUDA graphs;
the time is the median of 200 replays measured with CUDA events. Two selection granularities: per token
(top-k over every position) and per block (max-pooled index scores over blocks of 64 keys, top k/64
blocks, contiguous block gathers). Needs CUDA.
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from workbench.kernels.tuning import graph_replay_ms

HEADS, KV_HEADS, HEAD_DIM, INDEX_DIM = 32, 8, 128, 32
BLOCK = 64  # keys per block for block-level selection


def timed(fn, iters=200):
    """Median milliseconds of a CUDA-graph replay of fn."""
    return graph_replay_ms(fn, iters)


def run(context: int, batch: int, k: int) -> dict:
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, device=dev, dtype=dt)
    keys = torch.randn(batch, KV_HEADS, context, HEAD_DIM, device=dev, dtype=dt)
    values = torch.randn(batch, KV_HEADS, context, HEAD_DIM, device=dev, dtype=dt)
    index_keys = torch.randn(batch, KV_HEADS, context, INDEX_DIM, device=dev, dtype=dt)  # the indexer's cache
    group = HEADS // KV_HEADS

    def dense():
        return F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)

    def select():
        q_index = q[..., :INDEX_DIM].reshape(batch, KV_HEADS, group, INDEX_DIM)  # (B, Hkv, g, d)
        scores = torch.relu(torch.matmul(q_index, index_keys.transpose(-1, -2)))  # (B, Hkv, g, T)
        shared = scores.sum(dim=(1, 2))  # (B, T): one selection for all heads
        return shared.topk(k, dim=-1).indices  # (B, k)

    def sparse():
        idx = select()
        gather = idx[:, None, :, None].expand(batch, KV_HEADS, k, HEAD_DIM)
        k_sel, v_sel = keys.gather(2, gather), values.gather(2, gather)  # (B, Hkv, k, D)
        return F.scaled_dot_product_attention(q, k_sel, v_sel, enable_gqa=True)

    # block-level variant: one shared index head (DeepSeek's indexer keys are one head, MQA-like), scores
    # max-pooled over blocks of 64 keys, top k/64 blocks, contiguous K/V blocks gathered by block index
    shared_index = torch.randn(batch, context, INDEX_DIM * 2, device=dev, dtype=dt)
    w_heads = torch.randn(batch, HEADS, device=dev, dtype=dt).softmax(-1)
    n_blocks = k // BLOCK
    keys_b = keys.view(batch, KV_HEADS, context // BLOCK, BLOCK, HEAD_DIM)
    values_b = values.view(batch, KV_HEADS, context // BLOCK, BLOCK, HEAD_DIM)

    def select_blocks():
        q_index = q[:, :, 0, : INDEX_DIM * 2]  # (B, H, d)
        per_head = torch.relu(torch.matmul(q_index, shared_index.transpose(-1, -2)))  # (B, H, T)
        scores = torch.matmul(w_heads[:, None, :], per_head)[:, 0]  # (B, T): weighted over heads
        return scores.view(batch, -1, BLOCK).amax(-1).topk(n_blocks, dim=-1).indices  # (B, n_blocks)

    def sparse_blocks():
        idx = select_blocks()
        gather = idx[:, None, :, None, None].expand(batch, KV_HEADS, n_blocks, BLOCK, HEAD_DIM)
        k_sel = keys_b.gather(2, gather).view(batch, KV_HEADS, k, HEAD_DIM)
        v_sel = values_b.gather(2, gather).view(batch, KV_HEADS, k, HEAD_DIM)
        return F.scaled_dot_product_attention(q, k_sel, v_sel, enable_gqa=True)

    # fused: Triton index scoring (one pass over the index cache) + top blocks + Triton split-K decode over
    # the selected blocks read in place (workbench/kernels/sparse_decode.py)
    from workbench.kernels import sparse_decode as kern
    from workbench.attention.block_sparse import select_blocks as top_blocks
    seq_lens = torch.full((batch,), context, device=dev, dtype=torch.int32)
    q_index = q[:, :, 0, : INDEX_DIM * 2].contiguous()
    q_flat = q[:, :, 0].contiguous()

    def fused_select():
        return top_blocks(kern.index_block_scores(q_index, w_heads, shared_index, seq_lens, BLOCK), n_blocks,
                          sort=False)

    def fused():
        return kern.block_sparse_attention(q_flat, keys, values, fused_select(), seq_lens, BLOCK)

    dense_ms, select_ms, sparse_ms = timed(dense), timed(select), timed(sparse)
    block_select_ms, block_ms = timed(select_blocks), timed(sparse_blocks)
    fused_select_ms, fused_ms = timed(fused_select), timed(fused)
    kv_bytes = 2 * keys.numel() * keys.element_size()
    return {"context": context, "batch": batch, "k": k, "dense_ms": dense_ms,
            "token_select_ms": select_ms, "token_sparse_ms": sparse_ms, "token_speedup": dense_ms / sparse_ms,
            "block_select_ms": block_select_ms, "block_sparse_ms": block_ms, "block_speedup": dense_ms / block_ms,
            "fused_select_ms": fused_select_ms, "fused_sparse_ms": fused_ms, "fused_speedup": dense_ms / fused_ms,
            "dense_kv_gb_per_s": kv_bytes / dense_ms / 1e6}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--out", default=str(Path(__file__).with_name("decode_speed.json")))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_speed.py measures GPU kernels: it needs CUDA")
    rows = [run(c, b, args.k) for b in map(int, args.batches.split(",")) for c in map(int, args.contexts.split(","))]
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
