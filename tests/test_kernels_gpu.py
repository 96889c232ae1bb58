"""Triton kernels against their torch references (skipped without CUDA)."""
import pytest
import torch

from workbench.attention import block_sparse as ref
from workbench.sparsity.rules import Cut

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


@pytest.mark.parametrize("capacity", [256, 4096])
def test_dense_decode_attention_reads_each_sequence_s_own_blocks(cache, capacity):
    """Dense decode attention (no block list) over a cache of `capacity` positions: one split and no
    merge kernel for a short cache, eight splits over each sequence's own blocks for a long one."""
    from workbench.kernels.sparse_decode import dense_decode_attention, dense_splits
    assert dense_splits(capacity, 64) == (1 if capacity == 256 else 8)
    keys, values = cache["keys"][:, :, :capacity].contiguous(), cache["values"][:, :, :capacity].contiguous()
    lens = cache["seq_lens"].clamp(max=capacity)
    end = -(-int(lens[2]) // 64) * 64  # past the last block of the 130-token sequence: never read
    keys[2, :, end:], values[2, :, end:] = float("nan"), float("nan")
    got = dense_decode_attention(cache["q"], keys, values, lens, 64)
    for i, n in enumerate(lens.tolist()):
        q = cache["q"][i:i + 1, :, None]
        want = torch.nn.functional.scaled_dot_product_attention(
            q, keys[i:i + 1, :, :n], values[i:i + 1, :, :n], enable_gqa=True)[:, :, 0]
        assert torch.allclose(got[i:i + 1].float(), want.float(), rtol=2e-2, atol=2e-2)
    nz, seen = torch.zeros((), dtype=torch.int64, device="cuda"), torch.zeros((), dtype=torch.int64, device="cuda")
    cut = dense_decode_attention(cache["q"], keys, values, lens, 64, threshold=0.01, counters=(nz, seen))
    assert torch.equal(cut, torch.where(got.float().abs() > 0.01, got, 0))  # o's cut, applied as it is written
    assert int(nz) == int((cut != 0).sum()) and int(seen) == cut.numel()


def _close(got, want, tol=2e-2):
    """bf16/fp16 outputs against a float32 reference, relative to the output's scale."""
    err = (got.float() - want).abs().max().item()
    assert err <= tol * want.abs().max().item() + 1e-3, err


@pytest.mark.parametrize("tokens", [1, 4])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int8])
def test_sparse_gemv_matches_reference(sparsity, dtype, tokens):
    from workbench.kernels.sparse_gemv import sparse_gemv
    from workbench.formats import quant
    torch.manual_seed(0)
    k, n = 4096, 1000  # n not a multiple of the tile
    w = torch.randn(n, k, device="cuda") * 0.02
    x = torch.randn(tokens, k, device="cuda").to(torch.float16 if dtype == torch.float16 else torch.bfloat16)
    t = torch.quantile(x.float().abs(), sparsity, dim=-1) if sparsity else torch.full((tokens,), -1.0, device="cuda")
    if dtype == torch.int8:  # fused sparse + int8: q^T with one scale per output channel
        packed = quant.quantize_int8_channel(w)
        wt, scale, dense = packed["q"].t().contiguous(), packed["scale"], quant.dequantize_int8_channel(packed)
    else:
        wt, scale, dense = w.to(dtype).t().contiguous(), None, w.to(dtype).float()
    kept, seen = torch.zeros(2, dtype=torch.int64, device="cuda").unbind()
    got = sparse_gemv(x, t.float().contiguous(), wt, scale, kept, seen)
    mask = x.float().abs() > t[:, None]
    _close(got, torch.nn.functional.linear(x.float() * mask, dense))
    assert kept.item() == mask.sum().item() and seen.item() == x.numel()


@pytest.mark.parametrize("tokens", [1, 8, 24, 64])  # 24: a partly filled 32-row tile
@pytest.mark.parametrize("fmt", ["int8", "int8-block64", "int4-g32", "int4-g64", "int4-g128", "int4-g64-asym"])
def test_quant_gemv_matches_reference(fmt, tokens):
    """Every launch config the tuner may pick, not only the one it picked on this machine."""
    from workbench.kernels.quant_gemv import launch_candidates, quant_gemv
    from workbench.formats.packed import reference_matmul
    from workbench.policy import WEIGHT_FORMATS, parse_precision
    torch.manual_seed(0)
    spec = parse_precision(fmt)
    w = (torch.randn(1536, 4096, device="cuda") * 0.02).to(torch.bfloat16)
    packed = WEIGHT_FORMATS.get(spec.format).quantize(w, spec)
    x = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16)
    want = reference_matmul(packed, x.float()).float()
    _close(quant_gemv(x, packed.tensors), want)
    for config in launch_candidates(tokens, 1536, 4096, 8 if fmt.startswith("int8") else 4, x.device):
        _close(quant_gemv(x, packed.tensors, config=config), want)


@pytest.mark.parametrize("d", [576, 4096, 14336])
def test_topk_threshold_keeps_exactly_k(d):
    from workbench.kernels.topk import topk_threshold
    torch.manual_seed(0)
    x = torch.randn(3, d, device="cuda", dtype=torch.bfloat16).float()  # bf16 values held in float32: no ties
    x = x + torch.arange(d, device="cuda") * 1e-7  # break bf16 ties
    keep = d // 2
    cut = topk_threshold(x, keep)
    assert torch.equal(cut, x.abs().kthvalue(d - keep, dim=-1).values)
    assert ((x.abs() > cut[:, None]).sum(-1) == keep).all()


def _step_logits(engine, kernels: bool, graph: bool):
    """Prefill two prompts, then one decode step for both slots: (2, V) logits."""
    from workbench.runtime import Decoder, SlotKVCache
    from workbench.runtime.graphs import GraphedStep
    from workbench.transforms import wrappers
    for _, w in wrappers(engine.model):
        w.kernel = None if kernels else False
    decoder, cache = Decoder(engine.model), SlotKVCache.for_model(engine.model, 2, 64)
    with torch.inference_mode():
        for slot, text in enumerate(["The quick brown fox", "Sparse kernels for decoding"]):
            ids = torch.tensor(engine.tokenizer(text)["input_ids"], device="cuda")
            with engine.dense_prefill():
                decoder.prefill(cache, slot, ids)
        step = GraphedStep(decoder, cache) if graph else decoder.step
        engine.reset_stats()
        return step(cache, torch.tensor([65, 66], device="cuda")).clone()


@pytest.mark.parametrize("policy", [dict(), dict(sparsity=0.5, rule="topk"), dict(precision="int8"),
                                    dict(precision="int4-g64"), dict(sparsity=0.5, rule="topk", precision="int8"),
                                    dict(sparsity=0.4, rule="topk", precision="int4-g64"),
                                    dict(sparsity=0.5, rule="threshold"), dict(sparsity=0.5, rule="threshold",
                                                                               precision="int8")],
                         ids=["dense", "topk50", "int8", "int4-g64", "topk50+int8", "topk40+int4-g64", "threshold50",
                              "threshold50+int8"])
def test_kernels_in_a_captured_decode_step_match_the_reference_paths(policy):
    from workbench import Engine, Policy
    engine = Engine.from_pretrained("synthetic:smollm2-135m", device="cuda", dtype=torch.bfloat16,
                                    policy=Policy.uniform(**policy))
    want = _step_logits(engine, kernels=False, graph=False)
    got = _step_logits(engine, kernels=True, graph=True)
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    # exact top-k is a discontinuous choice: one rounding step moves entries across the cut, and over
    # 30 random layers that compounds; the same kernels with and without the graph agree tightly
    assert (cos > (0.97 if "rule" in policy else 0.999)).all(), cos
    again = _step_logits(engine, kernels=True, graph=False)  # split-K atomics sum in any order
    assert (torch.nn.functional.cosine_similarity(got, again, dim=-1) > (0.97 if "rule" in policy else 0.9999)).all()
    if policy.get("rule") == "topk":  # measured inside the graph by the kernels' counters (one replay: 2 tokens)
        assert abs(engine.stats()["achieved_sparsity"]["overall"] - policy["sparsity"]) < 0.01
    elif "rule" in policy:  # a calibrated cut: near the target on average, not exactly per token
        assert 0.2 < engine.stats()["achieved_sparsity"]["overall"] < 0.8


@pytest.mark.parametrize("policy", [dict(precision="int8"), dict(precision="int4-g64"),
                                    dict(sparsity=0.5, rule="threshold")], ids=["int8", "int4-g64", "threshold50"])
def test_programmatic_dependent_launch_changes_no_value(policy, monkeypatch):
    """Every kernel of the step launched with PDL (waiting in hardware for its producer) against plain
    launches: the same kernels and configs, so the same math."""
    from workbench import Engine, Policy
    from workbench.kernels import pdl
    if not pdl.enabled("cuda"):
        pytest.skip("PDL needs sm_90 or later")
    engine = Engine.from_pretrained("synthetic:smollm2-135m", device="cuda", dtype=torch.bfloat16,
                                    policy=Policy.uniform(**policy))
    with_pdl = _step_logits(engine, kernels=True, graph=True)
    monkeypatch.setenv("WORKBENCH_PDL", "0")
    plain = _step_logits(engine, kernels=True, graph=True)
    assert (torch.nn.functional.cosine_similarity(with_pdl.float(), plain.float(), dim=-1) > 0.9999).all()
    assert torch.equal(with_pdl.argmax(-1), plain.argmax(-1))


def test_dense_decode_equals_transformers_generate_on_gpu():
    from workbench import Engine
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cuda", dtype=torch.float32)
    prompts = ["abc", "hello world"]
    ours = engine.generate(prompts, max_new_tokens=16)
    engine.use_decode_loop = False
    assert [engine.generate([p], max_new_tokens=16)[0] for p in prompts] == ours


def test_fused_decode_ops_match_torch():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from workbench.kernels.decode_ops import add_rmsnorm, rope_and_cache, silu_mul
    torch.manual_seed(0)
    dt, dev = torch.bfloat16, "cuda"
    x, delta = (torch.randn(3, 1, 4096, device=dev, dtype=dt) for _ in range(2))
    w = torch.rand(4096, device=dev, dtype=dt) + 0.5
    counters = [(torch.zeros((), dtype=torch.int64, device=dev), torch.zeros((), dtype=torch.int64, device=dev))
                for _ in range(3)]
    out, h0 = add_rmsnorm(x, delta, w, 1e-5)
    _, h = add_rmsnorm(x, delta, w, 1e-5, cut=Cut("topk", 1024), counters=counters)
    s = (x + delta).float()
    want = (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dt) * w
    assert torch.equal(out, x + delta)
    _close(h0, want.float(), 1e-2)
    kept = (h != 0).sum(-1)
    assert ((kept <= 1024) & (kept >= 1000)).all()  # bf16 ties at the cut
    assert torch.equal(h, torch.where(h != 0, h0, 0))  # the same values, the rest zeroed
    for nz, seen in counters:  # each of the three readers counts the same kept / offered entries
        assert int(nz) == int(kept.sum()) and int(seen) == 3 * 4096
    _, ht = add_rmsnorm(x, delta, w, 1e-5, cut=Cut("threshold", 0.8))
    assert torch.equal(ht, torch.where(h0.float().abs() > 0.8, h0, 0))
    gu = torch.randn(2, 2 * 14336, device=dev, dtype=dt)
    g, u = gu.split([14336, 14336], dim=-1)  # halves of one joined gate|up output: strided rows
    y0 = silu_mul(g, u)
    _close(y0, (torch.nn.functional.silu(g) * u).float(), 1e-2)
    y = silu_mul(g, u, cut=Cut("topk", 7168), counters=counters[:1])
    above = (y != 0).sum(-1)
    assert (above <= 7168).all() and (above > 7100).all() and torch.equal(y, torch.where(y != 0, y0, 0))
    for nz, seen in counters[1:]:
        nz.zero_(), seen.zero_()
    yt = silu_mul(g, u, cut=Cut("threshold", 0.3), counters=counters[1:])  # a row in several programs
    assert torch.equal(yt, torch.where(y0.float().abs() > 0.3, y0, 0))
    for nz, seen in counters[1:]:
        assert int(nz) == int((yt != 0).sum()) and int(seen) == 2 * 14336
    s_, h_, hkv, d, t = 2, 32, 8, 128, 256
    q = torch.randn(s_, h_, d, device=dev, dtype=dt)
    k, v = torch.randn(s_, hkv, d, device=dev, dtype=dt), torch.randn(s_, hkv, d, device=dev, dtype=dt)
    ang = torch.rand(s_, d // 2, device=dev) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dt), torch.cat([ang.sin()] * 2, -1).to(dt)
    kc, vc = torch.zeros(s_, hkv, t, d, device=dev, dtype=dt), torch.zeros(s_, hkv, t, d, device=dev, dtype=dt)
    pos = torch.tensor([3, 200], device=dev)
    qr, kr = apply_rotary_pos_emb(q[:, None], k[:, None], cos[:, None], sin[:, None])  # (S, 1, H, D)
    joined = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=-1)  # one q|k|v output, split in views
    qj, kj, vj = joined.split([h_ * d, hkv * d, hkv * d], dim=-1)
    for args in ((q, k, v), (qj.view(s_, h_, d), kj.view(s_, hkv, d), vj.view(s_, hkv, d))):
        kc.zero_(), vc.zero_()
        q_rot = rope_and_cache(*args, cos, sin, pos, kc, vc)
        _close(q_rot, qr[:, 0].float(), 1e-2)
        for i, p in enumerate(pos.tolist()):
            _close(kc[i, :, p], kr[i, 0].float(), 1e-2)
            assert torch.equal(vc[i, :, p], v[i])


@pytest.mark.parametrize("precision", ["none", "int4-g64"])
def test_lora_on_cuda_trains_merges_and_gets_its_kernels_back(precision):
    """On a bf16 CUDA model: a training step runs through the wrappers; merging rounds W + BA to the
    layer's format (bf16 or int4), reported per layer, and lands far closer to the adapter model than the
    model before training; after the merge the decode step uses the Triton kernels again."""
    from workbench import Engine, Policy
    from workbench.lora import attach_lora, lora_layers, merge, train
    engine = Engine.from_pretrained("synthetic:smollm2-135m", device="cuda",
                                    policy=Policy.uniform(0.5, "topk", precision))
    ids = torch.randint(0, 1000, (1, 32), device="cuda")
    base = engine.forward(ids)
    attach_lora(engine, r=8, alpha=16, targets="all-linear")
    result = train(engine, ["some text to learn from " * 8] * 4, steps=2, lr=1e-3, batch=2, loss="kl", progress=False)
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    # Two small steps move W by less than bf16's rounding step: give the adapters a change the merge can
    # carry (as a longer run would), so the comparison below measures the merge, not the rounding floor.
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(engine.model):
            for lin in layer.lora_B.values():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, device="cuda") * 0.05)
    adapted = engine.forward(ids)
    report = merge(engine)
    assert not lora_layers(engine.model) and len(report) == 7 * 30
    assert min(r["sqnr_db"] for r in report.values()) > (15 if precision == "int4-g64" else 35)
    merged = engine.forward(ids)
    if precision == "none":  # bf16 rounding of W + BA: far below what the adapters changed
        assert (merged - adapted).norm() < 0.5 * (base - adapted).norm()
    else:  # int4 requantization re-rounds the whole weight: within what the int4 format costs on its own
        assert (merged - adapted).norm() < (base - engine.reference_logits(ids)).norm()
    first = engine.generate(["hello"], max_new_tokens=1, chat=False)[0]  # the batch runner, graphed, kernels on
    kernels = [m.kernel for m in engine.model.modules() if getattr(m, "is_workbench_linear", False)]
    assert kernels and all(kernels)  # every merged layer got its Triton kernel back
    with engine.dense_prefill():  # the runner prefills dense (TEAL's default): the same math here
        logits = engine.forward(engine.encode(["hello"], chat=False)["input_ids"])[0, -1]
    assert first == engine.tokenizer.decode([int(logits.argmax())], skip_special_tokens=True)


@pytest.mark.parametrize("precision", ["none", "int8"])
def test_graphed_prefill_equals_the_eager_prefill(precision):
    """Bucketed, padded and replayed from a graph: the same logits and the same cache as the eager pass."""
    from workbench import Engine, Policy
    from workbench.runtime import Decoder, SlotKVCache
    from workbench.runtime.graphs import GraphedPrefill
    engine = Engine.from_pretrained("synthetic:smollm2-135m", device="cuda", dtype=torch.bfloat16,
                                    policy=Policy.uniform(0.0, precision=precision))
    decoder = Decoder(engine.model)
    eager, graphed = (SlotKVCache.for_model(engine.model, 8, 256) for _ in range(2))
    prefill = GraphedPrefill(decoder, graphed)
    g = torch.Generator().manual_seed(0)
    cases = [([0, 1, 2], [70, 5, 33]), ([3, 4, 5, 6, 7], [12, 50, 64, 2, 30]), ([0, 1, 2], [80, 7, 40]),
             ([3, 4, 5, 6, 7], [12, 100, 64, 2, 90]), ([3], [1])]
    # 5 prompts: bucket 6 (a repeated row); the third case replays the first's bucket; the fourth is past
    # max_tokens (6 x 128) and runs eager
    with torch.inference_mode(), engine.dense_prefill():
        for slots, lengths in cases:
            prompts = [torch.randint(0, 1000, (n,), generator=g).cuda() for n in lengths]
            want = decoder.prefill_batch(eager, slots, prompts)
            got = prefill(graphed, slots, prompts)
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
            assert torch.equal(got.argmax(-1), want.argmax(-1))
            for slot, n in zip(slots, lengths):
                assert graphed.host_lengths[slot] == eager.host_lengths[slot] == n
                for a, b in zip(eager.keys + eager.values, graphed.keys + graphed.values):
                    torch.testing.assert_close(b[slot, :, :n], a[slot, :, :n], rtol=2e-2, atol=2e-2)
    assert sorted(prefill.graphs) == [(1, 1), (3, 128), (6, 64)]


def test_scheduler_on_gpu_answers_every_request_as_sequential_greedy():
    """Graphed prefill and graphed decode step under continuous batching: each answer is its own."""
    from workbench import Engine
    from workbench import SamplingParams
    from workbench.scheduler import Scheduler
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cuda", dtype=torch.float32)
    prompts = [f"prompt number {i} " + "word " * (i % 7) for i in range(20)]
    lengths = [3 + (i % 4) * 3 for i in range(len(prompts))]
    expected = [engine.generate([p], max_new_tokens=n, chat=False)[0] for p, n in zip(prompts, lengths)]
    with Scheduler(engine, max_num_seqs=6) as scheduler:
        assert scheduler.warm_up(64) > 0 and scheduler.runner.prefill_graphs is not None
        requests = [scheduler.submit(p, SamplingParams(max_new_tokens=n), chat=False) for p, n in zip(prompts, lengths)]
        assert [r.result(timeout=120)["text"] for r in requests] == expected
        assert scheduler.prefills < len(prompts)


def test_switching_back_to_a_policy_replays_the_graphs_it_captured():
    """A -> B -> A under continuous batching: the second time under A the serving runner replays the decode
    graph it captured the first time (the same object), and every answer equals the sequential greedy
    answer under its policy."""
    from workbench import Engine, Policy
    from workbench import SamplingParams
    from workbench.scheduler import Scheduler
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cuda", dtype=torch.float32)
    a, b = Policy.uniform(precision="int8"), Policy.uniform(0.5, "topk", "int4-g32")
    prompts = [f"switch {i} " + "word " * i for i in range(4)]

    def sequential(policy):
        engine.reconfigure(policy)
        return [engine.generate([p], max_new_tokens=6, chat=False)[0] for p in prompts]
    want = {"a": sequential(a), "b": sequential(b)}
    with Scheduler(engine, max_num_seqs=4) as scheduler:
        scheduler.set_policy(a)
        scheduler.warm_up(32, policies=[a, b])
        graphs = {}
        for name, policy in (("a", a), ("b", b), ("a", a)):
            scheduler.set_policy(policy)
            got = [scheduler.submit(p, SamplingParams(max_new_tokens=6), chat=False) for p in prompts]
            assert [r.result(timeout=120)["text"] for r in got] == want[name], name
            graphs.setdefault(name, []).append(scheduler.runner.graph)
        assert graphs["a"][0] is graphs["a"][1] and graphs["a"][0] is not graphs["b"][0]
