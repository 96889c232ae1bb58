import re

import pytest
import torch
from torch import nn

from workbench import ModelError
from workbench.models import load
from workbench.roles import attention_modules, linear_modules, role_of
from workbench.synthetic import SYNTHETIC_CONFIGS, TINY_ARCHITECTURES, byte_tokenizer

EXPECTED_ROLES = {
    "tiny-llama": {"q", "k", "v", "o", "gate", "up", "down", "lm_head"},
    "tiny-qwen2": {"q", "k", "v", "o", "gate", "up", "down", "lm_head"},
    "tiny-mistral": {"q", "k", "v", "o", "gate", "up", "down", "lm_head"},
    "tiny-gemma3": {"q", "k", "v", "o", "gate", "up", "down", "lm_head"},
    "tiny-deepseek_v3": {"q_a", "q_b", "kv_a", "kv_b", "o", "gate", "up", "down", "lm_head"},
    "tiny-deepseek_v32": {"q_a", "q_b", "kv_a", "kv_b", "o", "gate", "up", "down", "indexer", "lm_head"},
}


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_every_linear_of_every_architecture_has_a_role(arch):
    lm = load(f"synthetic:{arch}", device="cpu")
    roles = {role for _, _, role in linear_modules(lm.model)}
    assert None not in roles, [f for f, _, r in linear_modules(lm.model) if r is None]
    assert EXPECTED_ROLES[arch] <= roles
    n_layers = lm.model.config.num_hidden_layers
    assert sorted(m.layer_idx for _, m in attention_modules(lm.model)) == list(range(n_layers))


def test_moe_experts_and_router_roles():
    lm = load("synthetic:tiny-deepseek_v3", device="cpu")
    names = {fqn: role_of(fqn) for fqn, _ in lm.model.named_modules()}
    assert names["model.layers.1.mlp.experts"] == "experts"
    assert names["model.layers.1.mlp.gate"] == "router"
    assert names["model.layers.1.mlp.shared_experts.down_proj"] == "down"


def test_synthetic_models_are_seeded_and_run():
    a = load("synthetic:tiny-llama", device="cpu").model
    b = load("synthetic:tiny-llama", device="cpu").model
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), na
    logits = a(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 259)


@pytest.mark.parametrize("name, total, active", [
    ("llama-3-8b", 8.03e9, 8.03e9), ("llama-3.1-8b", 8.03e9, 8.03e9),
    ("deepseek-v2-lite", 15.7e9, 2.66e9),  # DeepSeek-V2-Lite: 15.7B, 2.4B active without the embeddings
])
def test_real_shape_configs_match_published_sizes(name, total, active):
    from transformers import AutoModelForCausalLM

    from workbench.synthetic import synthetic_config
    cfg = synthetic_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for k, p in model.named_parameters() if ".experts." in k)
    routed = getattr(cfg, "n_routed_experts", None)
    used = experts * cfg.num_experts_per_tok / routed if routed else 0
    assert abs(n - total) / total < 0.01 and abs(n - experts + used - active) / active < 0.01
    assert set(SYNTHETIC_CONFIGS) >= {"llama-3-8b", "llama-3.2-1b", "deepseek-v3-tiny", "deepseek-v3-slice"}


def test_byte_tokenizer_roundtrips_utf8():
    tok = byte_tokenizer()
    text = "naïve café — 東京"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.pad_token_id == 258 and tok.eos_token_id == 257


@pytest.mark.parametrize("name, message", [
    ("synthetic:nope", "unknown synthetic model 'nope'"),
    ("./no/such/folder", "model path not found"),
    ("", "model must be a name or a path"),
])
def test_bad_model_names(name, message):
    with pytest.raises(ModelError, match=re.escape(message)):
        load(name, device="cpu")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load(str(tmp_path), device="cpu")


def test_saved_folder_loads_like_any_hf_model(tmp_path):
    lm = load("synthetic:tiny-qwen2", device="cpu")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    again = load(str(tmp_path), device="cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(lm.model(ids).logits, again.model(ids).logits)
    assert isinstance(again.model.lm_head, nn.Linear)


@pytest.mark.parametrize("model, match, message", [
    ("synthetic:tiny-deepseek_v3", "role:experts", "routed experts (model.layers.1.mlp.experts) take no weight format"),
    ("synthetic:tiny-deepseek_v3", "*.mlp.experts", "take no weight format or sparsity yet"),
    ("synthetic:tiny-deepseek_v3", "model.layers.1.mlp.experts.3.*", "matches no module: the routed experts"),
    ("synthetic:tiny-llama", "role:experts", "'llama' has no routed experts"),
    ("synthetic:tiny-llama", "model.layers.0.mlp.experts.*", "'llama' has no routed experts"),
])
def test_a_rule_for_routed_experts_is_one_line_and_leaves_the_model(model, match, message):
    """Routed experts are one 3-D module per layer, outside every policy for now: a rule naming them (or an
    expert of them, or experts a dense model does not have) is refused before anything changes, while
    shared experts take rules as any MLP does."""
    from workbench import Engine, Policy, PolicyError
    from workbench.policy import parse_precision
    engine = Engine.from_pretrained(model, device="cpu", policy=Policy.parse("int8"))
    with pytest.raises(PolicyError, match=re.escape(message)):
        engine.reconfigure(Policy.uniform(precision="int8").with_rule(match, weights=parse_precision("int4-g32")))
    assert engine.policy.name == "int8"
    if "deepseek" in model:
        engine.reconfigure(Policy.uniform(precision="int8").with_rule("*.shared_experts.*",
                                                                      weights=parse_precision("int4-g32")))
        shared = engine.model.model.layers[1].mlp.shared_experts.gate_proj
        assert shared.setting.weights.label == "int4-g32"  # the rule took on the shared expert
