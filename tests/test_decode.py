"""The batch runner (the engine's one decode loop): equal to transformers' generate, slots joining and
leaving, stops, errors."""
import pytest
import torch

from workbench import Engine, InputError, Policy
from workbench.runtime import BatchRunner, Decoder, Finisher, SamplingParams, Sequence, SlotKVCache, unsupported_reason

LLAMA_FAMILY = ["synthetic:tiny-llama", "synthetic:tiny-qwen2", "synthetic:tiny-mistral"]
GEMMA = ["synthetic:tiny-gemma3", "synthetic:gemma3-tiny-window"]  # the second: an 8-key sliding layer + a global one
MLA = ["synthetic:tiny-deepseek_v3", "synthetic:deepseek-v3-tiny", "synthetic:tiny-deepseek_v32"]  # latent attention,
# routed experts; V3.2 with its own indexer (8 keys a query: the longer prompts and decodes select)
PROMPTS = ["abc", "hello world, a longer prompt", "x"]


def hf_greedy(engine: Engine, prompt: str, n: int) -> list[int]:
    """transformers' generate on one unpadded prompt: the reference tokens (a final end token dropped)."""
    batch = engine.encode([prompt], chat=False)
    out = engine.model.generate(**batch, max_new_tokens=n, do_sample=False, temperature=None, top_p=None,
                                top_k=None, pad_token_id=engine.tokenizer.pad_token_id)
    tokens = out[0, batch["input_ids"].shape[1]:].tolist()
    return tokens[:-1] if tokens and tokens[-1] in engine.eos_ids() else tokens


def run(engine: Engine, prompts, slots: int, params: SamplingParams, capacity: int = 128) -> list[Sequence]:
    runner = BatchRunner(engine, slots, capacity, finisher=Finisher(engine.eos_ids(), None))
    seqs = [Sequence(engine.tokenizer(p, add_special_tokens=False)["input_ids"], params) for p in prompts]
    with torch.inference_mode():
        for _ in runner.run(seqs):
            pass
    return seqs


@pytest.mark.parametrize("name", LLAMA_FAMILY + GEMMA + MLA)
def test_greedy_equals_transformers_token_for_token(name):
    engine = Engine.from_pretrained(name, device="cpu")
    seqs = run(engine, PROMPTS, slots=len(PROMPTS), params=SamplingParams(max_new_tokens=12))
    for prompt, seq in zip(PROMPTS, seqs):
        assert seq.tokens == hf_greedy(engine, prompt, 12)


def test_more_sequences_than_slots_join_as_slots_free():
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    lengths = [3, 9, 5, 7]
    prompts = ["one", "two two", "three", "four four four"]
    runner = BatchRunner(engine, slots=2, capacity=64, finisher=Finisher(engine.eos_ids(), None))
    seqs = [Sequence(engine.tokenizer(p, add_special_tokens=False)["input_ids"], SamplingParams(max_new_tokens=n))
            for p, n in zip(prompts, lengths)]
    in_flight = []
    with torch.inference_mode():
        for _ in runner.run(seqs):
            in_flight.append(sum(s.slot is not None for s in seqs))
    assert max(in_flight) == 2 and runner.free_slots == 2
    for prompt, seq, n in zip(prompts, seqs, lengths):
        assert seq.tokens == hf_greedy(engine, prompt, n)  # a reused slot carries nothing over


@pytest.mark.parametrize("policy", [Policy(), Policy.uniform(0.0, attention="topk:4")], ids=["dense", "sparse-attention"])
def test_batched_prefill_equals_prefilling_one_prompt_at_a_time(policy):
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu", policy=policy)
    prompts = [torch.tensor(engine.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    decoder = Decoder(engine.model)
    one, many = (SlotKVCache.for_model(engine.model, slots=4, capacity=64) for _ in range(2))
    with torch.inference_mode():
        alone = torch.stack([decoder.prefill(one, slot, p) for slot, p in zip([3, 0, 2], prompts)])
        together = decoder.prefill_batch(many, [3, 0, 2], prompts)  # slots out of order, lengths differ
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    assert many.host_lengths == one.host_lengths == [len(prompts[1]), 0, 1, len(prompts[0])]
    for slot, n in [(3, len(prompts[0])), (0, len(prompts[1])), (2, 1)]:  # the real positions match
        for a, b in zip(one.keys + one.values, many.keys + many.values):
            torch.testing.assert_close(b[slot, :, :n], a[slot, :, :n], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", [Policy(), Policy.uniform(0.5, "topk", "int8"), Policy.uniform(0.0, attention="topk:16")],
                         ids=["dense", "sparse-int8", "sparse-attention"])
def test_a_long_prompt_prefilled_in_chunks_is_the_same_math_as_one_pass(policy, monkeypatch):
    """Chunk by chunk, each attending to the cached keys before it: the logits and the cache equal one
    pass (no one-token last chunk: 301 = 3 x 100 + 1 runs as 100, 100, 101), and so does the greedy text."""
    from workbench.runtime import decoder as decoder_module
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu", policy=policy)
    ids = torch.randint(3, 250, (301,), generator=torch.Generator().manual_seed(0))
    decoder = Decoder(engine.model)
    whole, chunked = (SlotKVCache.for_model(engine.model, slots=2, capacity=512) for _ in range(2))
    with torch.inference_mode(), engine.dense_prefill():
        one = decoder.prefill(whole, 1, ids)
        calls = []
        engine.model.model.embed_tokens.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[1]))
        parts = decoder.prefill_chunked(chunked, 1, ids, chunk=100)
    assert calls == [100, 100, 101]
    torch.testing.assert_close(parts, one, rtol=1e-5, atol=1e-5)
    assert chunked.host_lengths == whole.host_lengths == [0, 301]
    for a, b in zip(whole.keys + whole.values, chunked.keys + chunked.values):
        torch.testing.assert_close(b[1, :, :301], a[1, :, :301], rtol=1e-5, atol=1e-5)
    prompt = " ".join(f"w{i}" for i in range(40))  # about 160 byte-level tokens
    want = engine.generate([prompt], max_new_tokens=8, chat=False)[0]
    monkeypatch.setattr(decoder_module, "PREFILL_CHUNK", 32)  # prefill_batch now chunks this prompt
    engine.invalidate()
    assert engine.generate([prompt], max_new_tokens=8, chat=False)[0] == want


@pytest.mark.parametrize("policy", [Policy(), Policy.uniform(0.0, attention="topk:6")], ids=["dense", "sparse-attention"])
def test_gemma_windows_hold_across_prefill_chunks_and_decode_steps(policy):
    """Gemma 3's sliding layer sees only its last 8 keys: a prompt prefilled in chunks (the window crossing
    each chunk's start) is the same math as one pass, and the greedy tokens equal transformers' on prompts
    many windows long."""
    engine = Engine.from_pretrained("synthetic:gemma3-tiny-window", device="cpu", policy=policy)
    ids = torch.randint(3, 250, (61,), generator=torch.Generator().manual_seed(1))
    decoder = Decoder(engine.model)
    whole, chunked = (SlotKVCache.for_model(engine.model, slots=1, capacity=128) for _ in range(2))
    with torch.inference_mode(), engine.dense_prefill():
        one = decoder.prefill(whole, 0, ids)
        parts = decoder.prefill_chunked(chunked, 0, ids, chunk=20)
    torch.testing.assert_close(parts, one, rtol=1e-5, atol=1e-5)
    prompt = " ".join(f"w{i}" for i in range(12))  # about 40 byte-level tokens: five windows
    ours = engine.generate([prompt], max_new_tokens=10, chat=False)
    engine.use_decode_loop = False
    assert engine.generate([prompt], max_new_tokens=10, chat=False) == ours


def test_sequence_longer_than_cache_fails_before_any_work():
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    calls = []
    engine.model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(InputError, match="exceeds the KV cache capacity of 16 tokens"):
        run(engine, ["fits", "this prompt is far too long"], slots=2, capacity=16,
            params=SamplingParams(max_new_tokens=4))
    assert calls == []


def test_finish_reasons_eos_stop_and_length():
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    free = run(engine, ["abc"], 1, SamplingParams(max_new_tokens=6, ignore_eos=True))[0].tokens
    seq = Sequence(engine.tokenizer("abc")["input_ids"], SamplingParams(max_new_tokens=6))
    runner = BatchRunner(engine, 1, 32, finisher=Finisher({free[2]}, None))  # call the third token "eos"
    with torch.inference_mode():
        list(runner.run([seq]))
    assert seq.finish_reason == "eos" and seq.tokens == free[:free.index(free[2])]
    text = engine.tokenizer.decode(free)
    stop = text[1:3] if len(text) > 3 else text
    out = engine.generate(["abc"], max_new_tokens=6, stop=[stop])[0]
    assert out == text[:text.index(stop)]  # OpenAI's rule: the stop string is not returned
    assert "".join(engine.stream("abc", max_new_tokens=6, stop=[stop])) == out


def test_sampling_with_a_seed_repeats_and_top_k_one_is_greedy():
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    a = run(engine, ["x"], 1, SamplingParams(max_new_tokens=8, temperature=1.0, seed=5, ignore_eos=True))
    b = run(engine, ["x"], 1, SamplingParams(max_new_tokens=8, temperature=1.0, seed=5, ignore_eos=True))
    assert a[0].tokens == b[0].tokens
    greedy = run(engine, ["x"], 1, SamplingParams(max_new_tokens=8, ignore_eos=True))[0].tokens
    top1 = run(engine, ["x"], 1, SamplingParams(max_new_tokens=8, temperature=0.7, top_k=1, ignore_eos=True))
    assert top1[0].tokens == greedy


@pytest.mark.parametrize("policy", [Policy.uniform(0.5, "topk"), Policy.uniform(0.0, precision="int4-g32"),
                                    Policy.uniform(0.0, attention="topk:8")],
                         ids=["sparsity", "int4", "sparse-attention"])
def test_policies_decode_the_same_in_our_loop_and_in_transformers(policy):
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu", policy=policy)
    ours = engine.generate(PROMPTS, max_new_tokens=8)
    engine.use_decode_loop = False
    assert engine.decode_path == "transformers"
    assert [engine.generate([p], max_new_tokens=8)[0] for p in PROMPTS] == ours


def test_other_architectures_say_why_and_use_transformers():
    engine = Engine.from_pretrained("synthetic:phi3-tiny", device="cpu")
    assert "phi3" in unsupported_reason(engine.model)
    assert engine.decode_path == "transformers"
    assert len(engine.generate(["abc"], max_new_tokens=3)) == 1


@pytest.mark.slow
def test_default_model_greedy_equals_transformers(default_engine):
    from workbench.tokens import render_chat
    prompt = render_chat(default_engine.tokenizer, [{"role": "user", "content": "Write a haiku about the sea."}])
    seq = run(default_engine, [prompt], 1, SamplingParams(max_new_tokens=40), capacity=256)[0]
    assert len(seq.tokens) > 10 and seq.tokens == hf_greedy(default_engine, prompt, 40)


def test_a_stream_closed_early_leaves_nothing_running():
    """A panel cancels its text stream between two tokens: the runner it used must come back empty."""
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    expected = engine.generate(["abc"], max_new_tokens=8, chat=False)[0]
    stream = engine.stream("hello there", max_new_tokens=50, chat=False)
    next(stream)
    stream.close()  # the consumer went away mid-way
    runner = engine.runner(1, 256)
    assert runner.running == [] and runner.free_slots == runner.slots
    assert engine.generate(["abc"], max_new_tokens=8, chat=False)[0] == expected


def test_latent_attention_caches_latents_and_absorbs_kv_b_at_decode(monkeypatch):
    """DeepSeek's MLA in the loop: the slot cache holds one latent (kv_lora_rank) and one rope key per token,
    decode steps score and read the latents with kv_b absorbed (never expanding the cache) and give
    transformers' logits, a prompt prefilled in chunks is the same math, and the engine reports the cache's
    bytes per token against what expanded keys and values would take."""
    engine = Engine.from_pretrained("synthetic:tiny-deepseek_v3", device="cpu")
    cfg = engine.model.config
    decoder = Decoder(engine.model)
    assert decoder.mla and not decoder.capturable  # routed experts: no CUDA graph
    cache = SlotKVCache.for_model(engine.model, slots=2, capacity=64)
    assert cache.keys[0].shape == (2, 1, 64, cfg.kv_lora_rank) and cache.values[0].shape == (2, 1, 64, 8)
    ids = torch.randint(3, 250, (20,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = engine.model(ids[None]).logits[0].float()  # transformers, the whole sequence at once
        decoder.prefill(cache, 1, ids[:12])
        expanded = []
        for attn in (l.self_attn for l in engine.model.model.layers):
            monkeypatch.setattr(attn, "expand_kv", lambda *a, _f=attn.expand_kv: expanded.append(1) or _f(*a))
        for i in range(12, 20):
            slot_ids = torch.tensor([0, int(ids[i])])
            logits = decoder.step(cache, slot_ids)
            cache.advance(torch.tensor([0, 1]), [1])
            torch.testing.assert_close(logits[1], want[i], rtol=1e-4, atol=1e-4)
    assert not expanded  # every decode step ran on the latents
    monkeypatch.undo()
    whole, chunked = (SlotKVCache.for_model(engine.model, slots=1, capacity=64) for _ in range(2))
    with torch.inference_mode():
        torch.testing.assert_close(decoder.prefill_chunked(chunked, 0, ids, chunk=7), decoder.prefill(whole, 0, ids),
                                   rtol=1e-5, atol=1e-5)
    engine.generate(["abc"], max_new_tokens=2)
    kv = engine.stats()["kv_cache"]
    assert kv["bytes_per_token"] == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert kv["expanded_bytes_per_token"] == cfg.num_hidden_layers * cfg.num_attention_heads * (8 + 8 + 16) * 4


@pytest.mark.parametrize("model", ["synthetic:tiny-deepseek_v3", "synthetic:tiny-deepseek_v32"])
@pytest.mark.parametrize("policy", ["int8", "topk50", "topk:6"])
def test_latent_attention_under_policies_decodes_as_transformers(policy, model):
    """A policy on kv_b (its packed weight) or a key selector: decode expands the latents through kv_b_proj
    itself, the same modules transformers runs, so the greedy tokens match (V3.2: within its indexer's
    selection)."""
    engine = Engine.from_pretrained(model, device="cpu", policy=Policy.parse(policy))
    ours = engine.generate(PROMPTS, max_new_tokens=8, chat=False)
    engine.use_decode_loop = False
    assert [engine.generate([p], max_new_tokens=8, chat=False)[0] for p in PROMPTS] == ours


def test_v32_indexer_keys_are_cached_and_narrow_attention_to_its_top_keys():
    """DeepSeek-V3.2's own indexer in the loop: its key per token sits in the slot cache beside the latents,
    and past `index_topk` keys a decode step attends only to the indexer's choice: its logits equal
    transformers' (which masks the same way), and differ from attending to every key."""
    engine = Engine.from_pretrained("synthetic:tiny-deepseek_v32", device="cpu")
    cfg = engine.model.config
    decoder = Decoder(engine.model)
    cache = SlotKVCache.for_model(engine.model, slots=1, capacity=64)
    assert [t.shape for t in cache.index_keys] == [(1, 1, 64, cfg.index_head_dim)] * cfg.num_hidden_layers
    ids = torch.randint(3, 250, (30,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = engine.model(ids[None]).logits[0].float()
        decoder.prefill(cache, 0, ids[:20])
        assert cache.index_keys[0][0, 0, :20].abs().sum() > 0 and cache.index_keys[0][0, 0, 20:].abs().sum() == 0
        logits = decoder.step(cache, ids[20:21])
        torch.testing.assert_close(logits[0], want[20], rtol=1e-4, atol=1e-4)
        everything = SlotKVCache.for_model(engine.model, slots=1, capacity=64)
        for layer in engine.model.model.layers:
            layer.self_attn.indexer.index_topk = 64  # every key selected
        decoder.prefill(everything, 0, ids[:20])
        assert not torch.allclose(decoder.step(everything, ids[20:21])[0], logits[0], atol=1e-4)


def test_expert_load_counts_every_routing_choice_and_resets():
    """stats()["expert_load"]: per MoE layer the tokens each routed expert got (top-k choices per token, so
    a layer's counts sum to tokens x top-k); zero after reset_stats; None for a dense model; its figure."""
    from workbench.viz import expert_load_figure
    engine = Engine.from_pretrained("synthetic:deepseek-v3-tiny", device="cpu")
    cfg = engine.model.config
    assert engine.stats()["expert_load"] is None
    engine.generate(PROMPTS, max_new_tokens=4, chat=False)
    load = engine.stats()["expert_load"]
    assert load["layers"] == list(range(cfg.first_k_dense_replace, cfg.num_hidden_layers))
    for tokens, counts in zip(load["tokens"], load["counts"]):
        assert len(counts) == cfg.n_routed_experts and sum(counts) == tokens * cfg.num_experts_per_tok > 0
    assert all(i >= 1.0 for i in load["imbalance"])
    fig = expert_load_figure(load)
    assert fig.data[0].type == "heatmap" and len(fig.data[0].z) == len(load["layers"])
    engine.reset_stats()
    assert engine.stats()["expert_load"] is None
    assert Engine.from_pretrained("synthetic:tiny-llama", device="cpu").stats()["expert_load"] is None


def test_the_fused_decode_kernels_refuse_other_layer_layouts_in_one_line():
    """Gemma 3 and DeepSeek decode through their own modules: the fused Llama-family step says why not
    (its layout check, which a CUDA bf16 model reaches), and a Llama model passes it."""
    from workbench.runtime.fused import layout_reason
    assert "not 'deepseek_v3'" in layout_reason(Engine.from_pretrained("synthetic:tiny-deepseek_v3", device="cpu").model)
    assert "not 'gemma3_text'" in layout_reason(Engine.from_pretrained("synthetic:tiny-gemma3", device="cpu").model)
    assert layout_reason(Engine.from_pretrained("synthetic:tiny-llama", device="cpu").model) is None
