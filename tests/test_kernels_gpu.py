"""Triton kernels against their torch references (skipped without CUDA)."""
import pytest
import torch

from workbench.ops import sparse_decode as ref

pytestmark = pytest.mark.gpu


@pytest.fixture
def cache():
    torch.manual_seed(0)
    b, h, hkv, t, d, di = 3, 32, 8, 4096, 128, 64
    dev, dt = "cuda", torch.bfloat16
    return dict(q=torch.randn(b, h, d, device=dev, dtype=dt), keys=torch.randn(b, hkv, t, d, device=dev, dtype=dt),
                values=torch.randn(b, hkv, t, d, device=dev, dtype=dt),
                q_index=torch.randn(b, h, di, device=dev, dtype=dt),
                weights=torch.randn(b, h, device=dev, dtype=dt).softmax(-1),
                index_keys=torch.randn(b, t, di, device=dev, dtype=dt),
                seq_lens=torch.tensor([4096, 3001, 130], device=dev, dtype=torch.int32))


def test_index_block_scores_match_reference(cache):
    from workbench.kernels.sparse_decode import index_block_scores
    got = index_block_scores(cache["q_index"], cache["weights"], cache["index_keys"], cache["seq_lens"], 64)
    want = ref.block_scores(cache["q_index"], cache["weights"], cache["index_keys"], cache["seq_lens"], 64)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite) and torch.equal(got[~finite], want[~finite])
    assert torch.allclose(got[finite], want[finite], rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("n_blocks", [1, 7, 32])
def test_block_sparse_attention_matches_reference(cache, n_blocks):
    from workbench.kernels.sparse_decode import block_sparse_attention
    scores = ref.block_scores(cache["q_index"], cache["weights"], cache["index_keys"], cache["seq_lens"], 64)
    blocks = ref.select_blocks(scores, n_blocks)
    got = block_sparse_attention(cache["q"], cache["keys"], cache["values"], blocks, cache["seq_lens"], 64)
    want = ref.block_sparse_attention(cache["q"], cache["keys"], cache["values"], blocks, cache["seq_lens"], 64)
    assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_all_blocks_equal_dense_attention(cache):
    """Selecting every block is dense attention over the valid prefix."""
    from workbench.kernels.sparse_decode import block_sparse_attention
    b, t = 3, 4096
    blocks = torch.arange(t // 64, device="cuda", dtype=torch.int32).expand(b, -1).contiguous()
    got = block_sparse_attention(cache["q"], cache["keys"], cache["values"], blocks, cache["seq_lens"], 64)
    for i, n in enumerate(cache["seq_lens"].tolist()):
        q = cache["q"][i:i + 1, :, None]  # (1, H, 1, D)
        dense = torch.nn.functional.scaled_dot_product_attention(
            q, cache["keys"][i:i + 1, :, :n], cache["values"][i:i + 1, :, :n], enable_gqa=True)[:, :, 0]
        assert torch.allclose(got[i:i + 1].float(), dense.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_gemv_matches_reference(sparsity, dtype):
    from workbench.kernels.sparse_gemv import sparse_gemv
    from workbench.ops.sparsify import threshold_sparsify
    torch.manual_seed(0)
    k, n = 4096, 1000  # n not a multiple of the tile
    w = (torch.randn(n, k, device="cuda") * 0.02).to(dtype)
    x = torch.randn(k, device="cuda").to(dtype)
    t = torch.quantile(x.float().abs(), sparsity).item() if sparsity else 0.0
    got = sparse_gemv(x, w.t().contiguous(), t)
    want = torch.nn.functional.linear(threshold_sparsify(x.float(), t), w.float())
    assert torch.allclose(got.float(), want, rtol=2e-2, atol=2e-2)
