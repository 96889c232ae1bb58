"""LoRA through peft on plain and policy-wrapped layers: attach, merge per format, unload, bad input."""
import pytest
import torch

from workbench import Engine, InputError, Policy
from workbench.lora import attach_lora, load_adapter, lora_layers, merge, save_adapter, train, unload

POLICIES = [Policy.identity(), Policy.uniform(precision="int8"), Policy.uniform(0.3, "topk", "int4-g32"),
            Policy.uniform(precision="bf16"), Policy.uniform(0.5, "topk")]
FLOAT_WEIGHTS = {"identity", "topk-0.50"}  # merging adds in float: the merged model equals the adapter model


def _perturb(engine):
    """Trained adapters are not zero: give lora_B values so the adapter changes the output."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(engine.model):
            for lin in layer.lora_B.values():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.05)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_merge_equals_the_adapter_model_within_the_formats_rounding(policy):
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu", policy=policy)
    ids = torch.randint(0, 250, (1, 16), generator=torch.Generator().manual_seed(1))
    base = engine.forward(ids)
    reference = engine.reference_logits(ids)
    handle = attach_lora(engine, r=4, alpha=8, targets=("q", "v", "down"))
    assert handle.trainable > 0 and len(handle.targets) == 6
    assert all(p.requires_grad == ("lora_" in n) for n, p in engine.model.named_parameters())
    assert torch.equal(engine.forward(ids), base)  # lora_B starts at zero: nothing changes yet
    _perturb(engine)
    adapted = engine.forward(ids)
    assert (adapted - base).abs().max() > 1e-3
    report = merge(engine)
    merged = engine.forward(ids)
    if not policy.is_identity:  # a policy's wrappers keep the original weights: the reference stays as it was
        assert torch.equal(engine.reference_logits(ids), reference)
    assert not lora_layers(engine.model)
    if policy.name in FLOAT_WEIGHTS:  # the adapter reads the sparsified input, so merging changes nothing
        assert torch.allclose(merged, adapted, atol=1e-4) and report == {}
    else:  # requantized with the update folded in: off by no more than the format's own rounding costs
        format_error = (base - reference).abs().max()
        assert (merged - adapted).abs().max() <= 1.5 * format_error + 1e-4
        assert report and all(r["sqnr_db"] > 10 for r in report.values())


def test_unload_restores_the_model_exactly():
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu", policy=Policy.uniform(precision="int8"))
    ids = torch.randint(0, 250, (1, 8))
    base = engine.forward(ids)
    attach_lora(engine, r=2, targets="all-linear")
    _perturb(engine)
    unload(engine)
    assert torch.equal(engine.forward(ids), base) and not lora_layers(engine.model)
    assert engine.generate(["abc"], max_new_tokens=3)  # the decode loop runs on the restored modules


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "rank r must be a positive integer"),
    (dict(r=-3), "rank r must be a positive integer"),
    (dict(targets=("nope",)), "match no module"),
    (dict(targets=()), "at least one role"),
    (dict(dropout=1.5), "dropout"),
])
def test_bad_arguments_name_the_problem(kwargs, message):
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    with pytest.raises(InputError, match=message):
        attach_lora(engine, **kwargs)
    assert not lora_layers(engine.model)  # nothing was changed


def test_a_second_attach_is_refused():
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    attach_lora(engine, r=2)
    with pytest.raises(InputError, match="already has LoRA adapters"):
        attach_lora(engine, r=2)


def test_training_lowers_the_loss_on_a_small_skill():
    """Teach a tiny model to continue a fixed pattern: the LM loss falls."""
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu", policy=Policy.uniform(0.3, "topk", "int8"))
    attach_lora(engine, r=8, alpha=16, targets="all-linear")
    data = ["abcabcabcabcabcabcabcabc", "xyzxyzxyzxyzxyzxyzxyz"] * 4
    seen = []
    result = train(engine, data, steps=30, lr=3e-3, batch=4, callback=lambda step, loss: seen.append(step),
                   progress=False)
    assert result.steps == 30 and seen == list(range(1, 31)) and result.tokens > 0
    assert sum(result.losses[-5:]) / 5 < 0.85 * sum(result.losses[:5]) / 5  # a random tiny model: it falls, slowly


def test_kl_loss_pulls_the_compressed_model_toward_the_reference():
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu", policy=Policy.uniform(0.5, "topk", "int4-g32"))
    attach_lora(engine, r=8, alpha=16, targets="all-linear")
    texts = ["the quick brown fox jumps over the lazy dog " * 3, "pack my box with five dozen liquor jugs " * 3]
    result = train(engine, texts * 4, steps=25, lr=3e-3, batch=4, loss="kl", progress=False)
    assert result.losses[-1] < result.losses[0]


def test_chat_data_trains_on_assistant_tokens_only(default_engine):
    from workbench.lora import load_examples
    chat = [[{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}]]
    (ex,) = load_examples(default_engine, chat)
    learned = default_engine.tokenizer.decode([t for t in ex.labels if t != -100])
    assert "Hi there!" in learned and "Say hi" not in learned


def test_stop_keeps_the_last_good_adapter_and_save_load_round_trips(tmp_path):
    import threading
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu", policy=Policy.uniform(precision="int8"))
    attach_lora(engine, r=4, targets=("q", "v"))
    stop = threading.Event()
    result = train(engine, ["abcdefgh" * 4] * 4, steps=50, lr=1e-3, batch=2, progress=False,
                   callback=lambda step, loss: stop.set() if step == 3 else None, stop=stop)
    assert result.stopped and result.steps == 3
    ids = torch.randint(0, 250, (1, 12))
    adapted = engine.forward(ids)
    save_adapter(engine, tmp_path / "a")
    fresh = Engine.from_pretrained("synthetic:tiny-llama", device="cpu", policy=Policy.uniform(precision="int8"))
    load_adapter(fresh, tmp_path / "a")
    assert torch.allclose(fresh.forward(ids), adapted, atol=1e-6)
    other_policy = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    with pytest.raises(InputError, match="trained under policy"):
        load_adapter(other_policy, tmp_path / "a")
    other_model = Engine.from_pretrained("synthetic:tiny-qwen2", device="cpu", policy=Policy.uniform(precision="int8"))
    with pytest.raises(InputError, match="another base model"):
        load_adapter(other_model, tmp_path / "a")


@pytest.mark.parametrize("data, message", [
    ([], "empty"), ([""], "empty text"), ([42], "neither a text"), ("missing.jsonl", "not found"),
])
def test_bad_datasets_name_the_problem(data, message):
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    attach_lora(engine, r=2)
    with pytest.raises(InputError, match=message):
        train(engine, data, steps=1, progress=False)


def test_malformed_jsonl_names_the_line(tmp_path):
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    attach_lora(engine, r=2)
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    with pytest.raises(InputError, match="d.jsonl:2"):
        train(engine, str(path), steps=1, progress=False)


@pytest.mark.parametrize("model", ["synthetic:tiny-llama", "synthetic:gemma3-tiny-window", "synthetic:tiny-deepseek_v3"])
def test_generation_with_adapters_attached_follows_the_adapted_model(model):
    """The decode loop runs the LoRA layers (Gemma 3's, DeepSeek's latent-attention projections and shared
    experts too): its greedy tokens are the adapted model's argmax."""
    engine = Engine.from_pretrained(model, device="cpu", policy=Policy.uniform(0.3, "topk", "int8"))
    attach_lora(engine, r=4, targets="all-linear")
    _perturb(engine)
    ids = engine.encode(["some prompt"], chat=False)["input_ids"]
    tokens = []
    for _ in range(4):  # greedy by hand with full forwards
        nxt = engine.forward(torch.cat([ids, torch.tensor([tokens], dtype=torch.long)], 1) if tokens else ids)
        tokens.append(int(nxt[0, -1].argmax()))
    (seq,) = engine.sequences(["some prompt"], engine.sampling(max_new_tokens=4), chat=False)
    with engine.exclusive(), torch.inference_mode():
        for _ in engine.runner(1, 128).run([seq]):
            pass
    assert seq.tokens and seq.tokens == tokens[:len(seq.tokens)]  # (an end-of-text token may end it early)
