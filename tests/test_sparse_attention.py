"""Sparse attention: selectors, causality, budgets, padding, capture, recall, DeepSeek-V3.2."""
import re

import pytest
import torch

from workbench import Engine, Policy, PolicyError
from workbench.attention.capture import capture_attention
from workbench.evaluate import evaluate
from workbench.policy import Attention, parse_attention

SELECTORS = ["topk:0.5", "indexer:0.5", "block:0.5", "window:2+8", "hierarchical:4/8,0.5"]
FULL = ["topk:1.0", "indexer:1.0", "block:1.0", "window:0+512", "hierarchical:4/8,1.0"]


def text_ids(engine, n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, n), generator=g)


@pytest.mark.parametrize("selector", FULL)
def test_full_budget_equals_dense(tiny_name, selector):
    engine = Engine.from_pretrained(tiny_name, device="cpu")
    ids = text_ids(engine)
    dense = engine.forward(ids)
    engine.reconfigure(Policy.uniform(attention=selector))
    assert torch.allclose(engine.forward(ids), dense, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("selector", SELECTORS)
def test_causality_prefill(tiny_name, selector):
    """Changing a later token never moves an earlier position's logits."""
    engine = Engine.from_pretrained(tiny_name, device="cpu", policy=Policy.uniform(attention=selector))
    ids = text_ids(engine, 40)
    changed = ids.clone()
    changed[0, 30:] = (changed[0, 30:] + 7) % 256
    a, b = engine.forward(ids), engine.forward(changed)
    assert torch.allclose(a[0, :30], b[0, :30], atol=1e-5)
    assert not torch.allclose(a[0, 30:], b[0, 30:])


@pytest.mark.parametrize("selector", SELECTORS)
def test_causality_decode_matches_prefill(selector):
    """Decoding token by token with a KV cache gives the same last-position logits as one prefill."""
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu", policy=Policy.uniform(attention=selector))
    ids = text_ids(engine, 32)
    full = engine.forward(ids)[0, -1]
    with torch.inference_mode():
        out = engine.model(input_ids=ids[:, :24], use_cache=True)
        cache = out.past_key_values
        for t in range(24, 32):
            out = engine.model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
    assert torch.allclose(out.logits[0, -1].float(), full, atol=1e-4)


def test_left_padding_is_respected():
    engine = Engine.from_pretrained("synthetic:tiny-qwen2", device="cpu", policy=Policy.uniform(attention="topk:8"))
    ids = text_ids(engine, 20)
    alone = engine.forward(ids)[0, -1]
    padded = torch.cat([torch.full((1, 6), 258), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 20, dtype=torch.long)], dim=1)
    assert torch.allclose(engine.forward(padded, mask)[0, -1], alone, atol=1e-4)


def test_capture_shapes_selection_and_recall():
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu", policy=Policy.uniform(attention="topk:8"))
    cap = capture_attention(engine, "the quick brown fox jumps over the lazy dog", layers=[1], heads=[0, 3])
    t = len(cap["tokens"])
    assert cap["dense"][1].shape == (2, t, t) and cap["selected"][1].shape == (2, t, t)
    dense = cap["dense"][1].astype("float32")
    assert abs(dense.sum(-1) - 1).max() < 1e-2  # probabilities
    assert (torch.tensor(dense).triu(1) == 0).all()  # causal: nothing above the diagonal
    kept = cap["selected"][1].sum(-1)
    assert kept.max() <= 8 + 4 + 1 and kept[:, -1].min() >= 8  # budget (+ sinks and current token)
    assert all(0 < r <= 1 for r in cap["recall"][1])
    # capture leaves the engine as it was
    assert engine.model.config._attn_implementation == "workbench"
    dense_engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    cap = capture_attention(dense_engine, "hello there", layers=[0])
    assert all(abs(r - 1) < 1e-3 for r in cap["recall"][0])
    assert dense_engine.model.config._attn_implementation != "workbench"


def test_eval_reports_recall():
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu", policy=Policy.uniform(attention="window:4+16"))
    r = evaluate(engine, max_tokens=128, seq_len=64, progress=False)
    assert 0 < r["attention_recall"] < 1 and r["kld_mean"] > 0
    engine.reconfigure(Policy.identity())
    assert evaluate(engine, max_tokens=64, progress=False)["attention_recall"] is None


def test_deepseek_v32_native_indexer_is_honoured_and_captured():
    engine = Engine.from_pretrained("synthetic:tiny-deepseek_v32", device="cpu")
    ids = text_ids(engine, 24)
    native = engine.forward(ids)
    engine.reconfigure(Policy.uniform(attention="topk:1.0"))  # our backend, full budget: the native mask stays
    assert torch.allclose(engine.forward(ids), native, atol=1e-4)
    cap = capture_attention(engine, "a short prompt for the indexer", layers=[0])
    assert cap["native"] == [0]
    kept = cap["selected"][0][0].sum(-1)
    assert kept.max() <= engine.model.config.index_topk  # the native top-k bounds what is attended
    assert cap["native_overlap"][0] == 1.0  # full budget: ours keeps everything the native indexer picks
    engine.reconfigure(Policy.uniform(attention="topk:2"))
    partial = capture_attention(engine, "a short prompt for the indexer", layers=[0])["native_overlap"][0]
    assert 0 < partial < 1


@pytest.mark.parametrize("text, message", [
    ("topk:0", "key count must be >= 1"),
    ("topk:1.5", "(0, 1]"),
    ("indexer:-3", "key count must be >= 1"),
    ("window:4-256", "expected window:SINKS+WINDOW"),
    ("window:4+0", "window must be an integer >= 1"),
    ("hierarchical:32", "expected hierarchical:LOCAL/REGIONAL"),
    ("hierarchical:0/128", "local must be an integer >= 1"),
    ("nope:5", "unknown attention selector 'nope'"),
    ("dense:5", "takes no budget"),
])
def test_bad_attention_specs(text, message):
    with pytest.raises(PolicyError, match=re.escape(message)):
        parse_attention(text)


def test_window_that_does_not_fit_the_context():
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    with pytest.raises(PolicyError, match="does not fit the model's 512-token context"):
        engine.reconfigure(Policy.uniform(attention="window:4+1000"))
    assert engine.policy.is_identity


def test_parsed_specs():
    assert parse_attention("topk:64") == Attention("topk", 64)
    assert parse_attention("indexer:0.25") == Attention("indexer", 0.25)
    assert parse_attention("window:4+256") == Attention("window", params={"sinks": 4, "window": 256})
    assert parse_attention("hierarchical:32/128") == Attention("hierarchical", params={"local": 32, "regional": 128})
