import re

import pytest
import torch

from workbench import Engine, InputError, Policy


@pytest.fixture
def llama() -> Engine:
    return Engine.from_pretrained("synthetic:tiny-llama", device="cpu")


def test_greedy_generate_matches_transformers(tiny_engine):
    batch = tiny_engine.encode(["abc", "hello world"])
    expected = tiny_engine.model.generate(**batch, max_new_tokens=6, do_sample=False,
                                          pad_token_id=tiny_engine.tokenizer.pad_token_id)
    texts = tiny_engine.tokenizer.batch_decode(expected[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert tiny_engine.generate(["abc", "hello world"], max_new_tokens=6) == texts


def test_stream_equals_generate(llama):
    whole = llama.generate(["stream me"], max_new_tokens=8)[0]
    assert "".join(llama.stream("stream me", max_new_tokens=8)) == whole


def test_sampling_is_seeded(llama):
    a = llama.generate(["x"], max_new_tokens=8, temperature=1.0, seed=3)
    b = llama.generate(["x"], max_new_tokens=8, temperature=1.0, seed=3)
    assert a == b


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=10_000), "exceeds the model's context of 512"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
])
def test_generate_rejects_bad_arguments(llama, kwargs, message):
    with pytest.raises(InputError, match=re.escape(message)):
        llama.generate(["x"], **kwargs)


@pytest.mark.parametrize("prompts", [[], "not a list", [""], [[{"role": "user"}]]])
def test_bad_prompts(llama, prompts):
    with pytest.raises(InputError):
        llama.generate(prompts, max_new_tokens=2)


def test_stats_measure_bytes(llama):
    stats = llama.stats()
    n = sum(p.numel() for p in llama.model.parameters())
    assert stats["parameters"] == n
    assert stats["weight_bytes"] == n * 4 == stats["fp32_bytes"]
    assert stats["weight_bytes_by_format"] == {"float32": n * 4}
    assert stats["reference_bytes"] == 0
    roles = {m["role"] for m in stats["modules"]}
    assert {"q", "k", "v", "o", "gate", "up", "down"} <= roles


def test_tied_embeddings_counted_once():
    engine = Engine.from_pretrained("synthetic:tiny-gemma3", device="cpu")  # gemma ties lm_head
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
    n = sum(p.numel() for p in engine.model.parameters())  # parameters() yields a tied tensor once
    assert engine.stats()["parameters"] == n


def test_reconfigure_rejects_non_policies(llama):
    with pytest.raises(InputError, match="takes a Policy"):
        llama.reconfigure({"default": {}})


def test_forward_returns_float32_logits(llama, sample_ids):
    logits = llama.forward(sample_ids)
    assert logits.dtype == torch.float32 and logits.shape == (2, 24, 259)
    assert llama.stats()["last_forward_ms"] > 0
    llama.reconfigure(Policy.identity())
    assert llama.policy.is_identity
