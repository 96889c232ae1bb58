"""The standalone GEMV kernels (`gemv_int8`, `gemv_int4`, `gemv_sparse`) against their torch references.

Skipped without CUDA. Shapes that are not multiples of the block sizes (N = 1000, K = 576: the int4 group
of 64 divides K, the 128/256-wide K steps do not), batch sizes 1, 3, 8, 17, 64, fresh random inputs each
test, outputs poisoned with NaN before the launch so an unwritten element fails.
Tolerance: ||out - ref|| / ||ref|| < 1e-2 (bf16 output rounding is ~3e-3; the kernels accumulate in
float32 and their weight operands are exact in bf16).
"""
import os

import pytest
import torch

pytestmark = pytest.mark.gpu

os.environ.setdefault("WORKBENCH_TUNE", "0")  # the default launch config: deterministic and few compiles

TOKENS = (1, 3, 8, 17, 64)
N, K = 1000, 576
TOL = 1e-2


def _rel(got, want):
    assert torch.isfinite(got).all(), "unwritten or non-finite output"
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def _poisoned(m, n, dtype=torch.bfloat16):
    return torch.full((m, n), float("nan"), device="cuda", dtype=dtype)


def _weight(n=N, k=K, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(n, k, device="cuda", generator=g) * 0.05


@pytest.mark.parametrize("m", TOKENS)
def test_int8_matches_reference(m):
    from workbench.kernels import gemv_int8
    from workbench.formats.quant import quantize_int8_channel
    t = quantize_int8_channel(_weight(seed=m))
    packed = gemv_int8.pack(t)
    x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
    cfg = gemv_int8.candidates(m, N, K, x.device)[0]
    y = gemv_int8.launch(x, packed, cfg, y=_poisoned(m, N))
    assert _rel(y, gemv_int8.reference(x, t)) < TOL


@pytest.mark.parametrize("split", [1, 3])
def test_int8_split_k_is_deterministic(split):
    from workbench.kernels import gemv_int8
    from workbench.formats.quant import quantize_int8_channel
    t = quantize_int8_channel(_weight(n=4096, k=4096))
    packed = gemv_int8.pack(t)
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    cfg = dict(block_n=128, block_k=128, warps=4, stages=4, split=split)
    ys = [gemv_int8.launch(x, packed, cfg, y=_poisoned(8, 4096)) for _ in range(3)]
    assert _rel(ys[0], gemv_int8.reference(x, t)) < TOL
    assert all(torch.equal(ys[0], y) for y in ys[1:])  # partials summed in a fixed order


@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_matches_reference(m, symmetric):
    from workbench.kernels import gemv_int4
    from workbench.formats.quant import quantize_int4
    t = quantize_int4(_weight(seed=m), 64, symmetric=symmetric)
    packed = gemv_int4.pack(t)
    x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
    cfg = gemv_int4.candidates(m, N, K, 64, x.device, asym=not symmetric)[0]
    y = gemv_int4.launch(x, packed, cfg, y=_poisoned(m, N))
    assert _rel(y, gemv_int4.reference(x, t)) < TOL


def test_int4_pack_keeps_bytes_and_round_trips():
    from workbench.kernels import gemv_int4
    from workbench.formats.quant import quantize_int4
    for symmetric in (True, False):
        t = quantize_int4(_weight(), 64, symmetric=symmetric)
        packed = gemv_int4.pack(t)
        assert gemv_int4.nbytes(packed) == sum(v.numel() * v.element_size() for v in t.values())
        back = gemv_int4.unpack(packed)
        assert all(torch.equal(back[key], t[key]) for key in t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", [dict(scaled=False), dict(scaled=True, pair=True)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_split_k_modes_and_fp16(dtype, mode, symmetric):
    """Exact (integer partials scaled in float32) and scaled (dequantized in registers, two groups a
    step) modes, split K, fp16 activations."""
    from workbench.kernels import gemv_int4
    from workbench.formats.quant import quantize_int4
    t = quantize_int4(_weight(n=4096, k=4096), 64, symmetric=symmetric)
    packed = gemv_int4.pack(t)
    x = torch.randn(3, 4096, device="cuda", dtype=dtype)
    cfg = dict(block_n=128, warps=4, stages=4, split=5, **mode)
    y = gemv_int4.launch(x, packed, cfg, y=_poisoned(3, 4096, dtype))
    assert _rel(y, gemv_int4.reference(x, t)) < TOL


@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("group, k", [(64, K), (128, 640)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_weight_as_a_matches_reference(m, group, k, dtype):
    """The weight-as-A kernel (quarter layout, wgmma with the weight in registers), split and unsplit."""
    from workbench.kernels import gemv_int4
    from workbench.kernels.layouts import quarter_unpack
    from workbench.formats.quant import quantize_int4
    t = quantize_int4(_weight(k=k, seed=m), group)
    packed = gemv_int4.pack(t)
    values = torch.stack((t["q"] & 15, t["q"] >> 4), dim=-1).reshape(N, k)
    assert torch.equal(quarter_unpack(packed["qq"], group), values)  # same nibbles, new order
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    cands = [c for c in gemv_int4.candidates(m, N, k, group, x.device) if c.get("wa")]
    assert cands
    for cfg in (cands[0], dict(cands[-1], split=3)):
        y = gemv_int4.launch(x, packed, cfg, y=_poisoned(m, N, dtype))
        assert _rel(y, gemv_int4.reference(x, t)) < TOL, cfg


@pytest.mark.parametrize("group, k", [(64, K), (64, 4096), (128, 640), (32, 1024)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_one_token_on_cuda_cores_matches_reference(group, k, dtype):
    """The CUDA-core kernel for one token: every config offered for the shape (one or two groups a
    step, as the group count allows), split and unsplit."""
    from workbench.kernels import gemv_int4
    from workbench.formats.quant import quantize_int4
    t = quantize_int4(_weight(k=k, seed=group), group)
    packed = gemv_int4.pack(t)
    x = torch.randn(1, k, device="cuda", dtype=dtype)
    cands = [c for c in gemv_int4.candidates(1, N, k, group, x.device) if c.get("cc")]
    assert cands and not [c for c in gemv_int4.candidates(2, N, k, group, x.device) if c.get("cc")]
    want = gemv_int4.reference(x, t)
    for cfg in cands + [dict(cands[0], split=3)]:
        y = gemv_int4.launch(x, packed, cfg, y=_poisoned(1, N, dtype))
        assert _rel(y, want) < TOL, cfg


def _cut(x, frac):
    """Per-token threshold keeping a fraction `frac` of |x| (strictly above the cut)."""
    keep = max(1, int(round(frac * x.shape[1])))
    return torch.kthvalue(x.abs().float(), x.shape[1] - keep, dim=1).values


@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("int8", [False, True])
def test_sparse_matches_reference(m, int8):
    from workbench.kernels import gemv_sparse
    from workbench.formats.quant import quantize_int8_channel
    w = _weight(seed=m)
    packed = gemv_sparse.pack_int8(quantize_int8_channel(w)) if int8 else gemv_sparse.pack(w.to(torch.bfloat16))
    x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
    t = _cut(x, 0.5)
    cands = gemv_sparse.candidates(m, N, K, int8, x.device)
    if m == 1:  # one config of every one-token kernel the tuner offers, plus the masked-row FMA / dot ones
        cands = list({c["kind"]: c for c in reversed(cands)}.values()) + [
            dict(kind="fma", block_n=256, block_k=64, warps=8, stages=1, split=3),
            dict(kind="dot", block_n=256, block_k=32, warps=4, stages=4, split=2)]
    for cfg in cands[:1] if m > 1 else cands:
        y = gemv_sparse.launch(x, t, packed, cfg, y=_poisoned(m, N))
        assert _rel(y, gemv_sparse.reference(x, t, packed)) < TOL, cfg


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize("k", [576, 4100])
def test_sparse_one_token_in_cuda_cpp_matches_reference(wdtype, k):
    """`sparse_gemv1` (CUDA C++), every config: N = 1008 (whole 16-byte loads, not whole column tiles),
    K = 4100 (slabs over several blocks, the last one short), 50% and the extremes (keep all, keep none),
    twice in a row and replayed in a CUDA graph (the slab counters are reset by each launch)."""
    from workbench.kernels import gemv_sparse
    from workbench.formats.quant import quantize_int8_channel
    n = 1008
    w = _weight(n=n, k=k, seed=k)
    xdt = torch.float16 if wdtype == torch.float16 else torch.bfloat16
    packed = gemv_sparse.pack_int8(quantize_int8_channel(w)) if wdtype == torch.int8 else gemv_sparse.pack(w.to(wdtype))
    x = torch.randn(1, k, device="cuda", dtype=xdt)
    cands = [c for c in gemv_sparse.candidates(1, n, k, wdtype == torch.int8, x.device) if c["kind"] == "cuda"]
    assert cands
    for t in (_cut(x, 0.5), torch.zeros(1, device="cuda"), torch.full((1,), 1e30, device="cuda")):
        want = gemv_sparse.reference(x, t, packed)
        for cfg in cands:
            for _ in range(2):
                y = gemv_sparse.launch(x, t, packed, cfg, y=_poisoned(1, n, xdt))
                if t.item() > 1e29:
                    assert torch.equal(y, torch.zeros_like(y)), cfg
                else:
                    assert _rel(y, want) < TOL, cfg
    cfg = cands[-1]
    t = _cut(x, 0.5)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gemv_sparse.launch(x, t, packed, cfg)
    for seed in range(3):
        x.copy_(torch.randn(1, k, device="cuda", dtype=xdt, generator=torch.Generator(device="cuda").manual_seed(seed)))
        t.copy_(_cut(x, 0.5))
        graph.replay()
        assert _rel(y, gemv_sparse.reference(x, t, packed)) < TOL


def test_sparse_extremes_and_same_math_as_masked_dense():
    """Threshold 0 keeps every nonzero input (dense); a huge one keeps none (y = 0); and the sparse
    kernel equals masking the input and multiplying densely."""
    from workbench.kernels import gemv_sparse
    w = _weight().to(torch.bfloat16)
    packed = gemv_sparse.pack(w)
    x = torch.randn(3, K, device="cuda", dtype=torch.bfloat16)
    dense = gemv_sparse.sparse_gemv(x, 0.0, packed)
    assert _rel(dense, (x.double() @ w.double().T).float()) < TOL
    none = gemv_sparse.sparse_gemv(x, 1e30, packed)
    assert torch.equal(none, torch.zeros_like(none))
    t = _cut(x, 0.3)
    masked = gemv_sparse.mask_input(x, t).double() @ w.double().T
    assert _rel(gemv_sparse.sparse_gemv(x, t, packed), masked.float()) < TOL


def test_graph_capture_replays():
    """Every kernel runs inside a CUDA graph after one warm call (the split-K workspace exists)."""
    from workbench.kernels import gemv_int4, gemv_int8, gemv_sparse
    from workbench.formats.quant import quantize_int4, quantize_int8_channel
    w = _weight(n=4096, k=4096)
    p8, p4, ps = (gemv_int8.pack(quantize_int8_channel(w)), gemv_int4.pack(quantize_int4(w, 64)),
                  gemv_sparse.pack(w.to(torch.bfloat16)))
    x = torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16)
    t = _cut(x, 0.5)
    fns = [lambda: gemv_int8.gemv(x, p8), lambda: gemv_int4.gemv(x, p4), lambda: gemv_sparse.sparse_gemv(x, t, ps)]
    eager = [f() for f in fns]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [f() for f in fns]
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("group, k", [(64, K), (128, 640), (64, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_on_tensor_cores_in_cuda_cpp_matches_reference(m, group, k, dtype):
    """The CUDA C++ kernel (`gemv_int4_mma`), every config, N = 1000 (not a multiple of its 16-row tile),
    with and without programmatic dependent launch."""
    from workbench.kernels import gemv_int4, gemv_int4_mma
    from workbench.formats.quant import quantize_int4
    t = quantize_int4(_weight(k=k, seed=group + m), group)
    layout = gemv_int4_mma.pack(t)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    want = gemv_int4.reference(x, t)
    cands = gemv_int4_mma.candidates(m, N, k, group)
    # blocks of 2-4 tiles from 17 tokens on, where they fit the registers (at 64 tokens: groups of 64 only)
    assert any(c["rows"] > 1 for c in cands) == (m == 17 or (m == 64 and group == 64)), cands
    for cfg in cands:
        for pdl in ("0", "1"):
            os.environ["WORKBENCH_PDL"] = pdl
            try:
                y = gemv_int4_mma.launch(x, layout, cfg, y=_poisoned(m, N, dtype))
            finally:
                os.environ.pop("WORKBENCH_PDL")
            assert _rel(y, want) < TOL, (cfg, pdl)


def test_int4_on_tensor_cores_replays_in_a_cuda_graph_on_new_inputs():
    from workbench.kernels import gemv_int4, gemv_int4_mma
    from workbench.formats.quant import quantize_int4
    t = quantize_int4(_weight(k=1024), 64)
    layout = gemv_int4_mma.pack(t)
    x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
    cfg = gemv_int4_mma.candidates(8, N, 1024, 64)[0]
    y = gemv_int4_mma.launch(x, layout, cfg)  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gemv_int4_mma.launch(x, layout, cfg)
    for seed in range(3):
        x.copy_(torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16, generator=torch.Generator(
            device="cuda").manual_seed(seed)))
        graph.replay()
        assert _rel(y, gemv_int4.reference(x, t)) < TOL


@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("k", [K, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_on_tensor_cores_in_cuda_cpp_matches_reference(m, k, dtype):
    """`gemv_int8_mma`, every config, N = 1000 (not a multiple of its 16-row tile)."""
    from workbench.kernels import gemv_int8, gemv_int8_mma
    from workbench.formats.quant import quantize_int8_channel
    t = quantize_int8_channel(_weight(k=k, seed=m))
    layout = gemv_int8_mma.pack(t)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    want = gemv_int8.reference(x, t)
    cands = gemv_int8_mma.candidates(m, N, k)
    assert any(c["rows"] > 1 for c in cands) == (m > 16), cands  # blocks of 2-4 tiles from 17 tokens on
    for cfg in cands:
        y = gemv_int8_mma.launch(x, layout, cfg, y=_poisoned(m, N, dtype))
        assert _rel(y, want) < TOL, cfg


@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_weights_on_tensor_cores_in_cuda_cpp_match_reference(m, dtype):
    """`gemv_bf16_mma` on the stored (N, K) weight, every config, N = 1000 (not a multiple of 16)."""
    from workbench.kernels import gemv_bf16_mma
    w = _weight(k=K, seed=m).to(dtype)
    x = torch.randn(m, K, device="cuda", dtype=dtype)
    want = x.double() @ w.double().T
    for cfg in gemv_bf16_mma.candidates(m, N, K):
        y = gemv_bf16_mma.launch(x, w, cfg, y=_poisoned(m, N, dtype))
        assert _rel(y, want) < TOL, cfg


@pytest.mark.parametrize("m", TOKENS)
def test_dense_linear_tunes_between_cublas_and_ours_on_the_same_math(m, monkeypatch):
    """`dense_linear`: our GEMV is offered after its check against cuBLAS, every candidate computes
    F.linear's product, the tuned choice serves 3-D inputs, and a captured graph replays it on new inputs."""
    import torch.nn.functional as F
    from workbench.kernels import dense_paths
    from workbench.kernels.tuning import remembered
    monkeypatch.setenv("WORKBENCH_TUNE", "1")
    w = _weight(k=1024, seed=m).to(torch.bfloat16)
    x = torch.randn(m, 1, 1024, device="cuda", dtype=torch.bfloat16)
    want = x.double() @ w.double().T
    cands = dense_paths._candidates(x[:, 0], w)
    assert cands[0] == {"impl": "cublas"} and any(c["impl"] == "w16mma" for c in cands), cands
    for cfg in cands:
        assert _rel(dense_paths._launch(x[:, 0], w, cfg), want[:, 0]) < TOL, cfg
    y = dense_paths.dense_linear(x, w)
    assert y.shape == (m, 1, N) and _rel(y, want) < TOL
    assert remembered(("dense_paths", N, 1024, torch.bfloat16, m)) in cands
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = dense_paths.dense_linear(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert _rel(y, F.linear(x.double(), w.double())) < TOL
    x65 = torch.randn(65, 1024, device="cuda", dtype=torch.bfloat16)  # beyond 64 tokens: cuBLAS, untuned
    assert torch.equal(dense_paths.dense_linear(x65, w), F.linear(x65, w))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_the_tuner_offers_our_cuda_cpp_kernels_after_checking_them(fmt):
    """QuantPaths checks the CUDA C++ kernel against the Triton one and offers its configs; each launches
    through QuantPaths to the reference's output."""
    from workbench.formats.quant import quantize_int4, quantize_int8_channel
    from workbench.kernels import gemv_int4, gemv_int8
    from workbench.kernels.quant_paths import QuantPaths
    t = quantize_int4(_weight(k=1024), 64) if fmt == "int4" else quantize_int8_channel(_weight(k=1024))
    paths = QuantPaths(t, fmt, torch.bfloat16)
    impl = "w4mma" if fmt == "int4" else "w8mma"
    assert paths.offered[impl]
    x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
    want = (gemv_int4 if fmt == "int4" else gemv_int8).reference(x, t)
    ours = [c for c in paths.candidates(x) if c["impl"] == impl]
    assert ours, paths.rejected
    for cfg in ours:
        assert _rel(paths.launch(x, cfg), want) < TOL, cfg
