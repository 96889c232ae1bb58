"""Activation-aware scaling (`formats.awq`): the input scale folds into the RMSNorm exactly (a near-lossless
format stays next to the reference), the search is never worse than rounding on its own measure, the
reference and other policies see the original norms, export carries the folded norms, and a half-awq
norm group or a model whose norms it cannot fold into is one line."""
import pytest
import torch

from workbench import Engine, Policy, PolicyError
from workbench.policy import parse_precision


def _engine(precision=None, model="synthetic:tiny-llama"):
    engine = Engine.from_pretrained(model, device="cpu")
    if precision:
        engine.reconfigure(Policy.uniform(precision=precision))
    return engine


def _norm(engine, i=0):
    return engine.model.model.layers[i].input_layernorm.weight


@pytest.mark.parametrize("model", ["synthetic:tiny-llama", "synthetic:tiny-gemma3"])
def test_the_fold_is_exact_and_the_search_no_worse_than_rounding(sample_ids, model):
    engine = _engine(model=model)  # Gemma's norm scales by (1 + w): its fold is (1 + w) / s - 1
    original, reference = _norm(engine).detach().clone(), engine.reference_logits(sample_ids)

    def cos_min():
        return torch.nn.functional.cosine_similarity(engine.forward(sample_ids), reference, dim=-1).min()
    engine.reconfigure(Policy.uniform(precision="int8-g32"))
    rounded = cos_min()
    engine.reconfigure(Policy.uniform(precision="int8-g32-awq"))  # 8 bits: what is left is the fold
    assert not torch.equal(_norm(engine), original)  # g / s
    assert cos_min() > min(rounded - 1e-4, 0.9999), (cos_min(), rounded)  # as close as rounding alone
    facts = engine.stats()["awq"]
    assert len(facts) == 2 * engine.model.config.num_hidden_layers
    assert all(f["error"] <= f["rtn_error"] for f in facts.values())
    engine.reconfigure(Policy.uniform(precision="int3-g32-awq"))
    assert any(f["error"] < f["rtn_error"] and f["alpha"] > 0 for f in engine.stats()["awq"].values())
    engine.reconfigure(Policy.uniform(precision="int4-g128-awq"))  # 64 inputs: falls back to g64, searched so
    assert engine.stats()["fallbacks"] and len(engine.stats()["awq"]) == len(facts)


def test_the_reference_and_other_policies_see_the_original_norms(sample_ids):
    engine = _engine()
    original, reference = _norm(engine).detach().clone(), engine.reference_logits(sample_ids)
    engine.reconfigure(Policy.uniform(precision="int4-g32-awq"))
    awq_logits = engine.forward(sample_ids)
    assert torch.equal(engine.reference_logits(sample_ids), reference)
    assert not torch.equal(_norm(engine), original)  # folded again after the reference pass
    engine.reconfigure(Policy.uniform(precision="int4-g32"))
    assert torch.equal(_norm(engine), original) and engine.stats()["awq"] == {}
    engine.reconfigure(Policy.uniform(precision="int4-g32-awq"))  # the scales are kept: no new search
    assert torch.equal(engine.forward(sample_ids), awq_logits)
    engine.reconfigure(Policy.identity())
    assert torch.equal(_norm(engine), original) and torch.equal(engine.forward(sample_ids), reference)


def test_a_gguf_export_carries_the_folded_norms(tmp_path):
    from transformers import AutoModelForCausalLM

    from workbench.export.gguf import export_gguf
    engine = _engine("int4-g32-awq")
    report = export_gguf(engine, tmp_path / "m.gguf", progress=False)
    assert set(report["by_type"]) == {"Q4_0", "F32"} and not report["requantized"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ids = torch.tensor([engine.tokenizer("awq, exported")["input_ids"]])
    with torch.inference_mode():
        assert torch.equal(model(ids).logits[0], engine.forward(ids)[0].float())


def test_a_half_awq_group_and_a_model_without_foldable_norms_are_one_line(sample_ids):
    engine = _engine("int4-g32")
    before = engine.forward(sample_ids)
    half = Policy.uniform(precision="int4-g32").with_rule("model.layers.0.self_attn.q_proj",
                                                          weights=parse_precision("int4-g32-awq"))
    with pytest.raises(PolicyError, match="input_layernorm, which also feeds k_proj, v_proj: give them awq too"):
        engine.reconfigure(half)
    assert engine.policy.name == "int4-g32" and torch.equal(engine.forward(sample_ids), before)
    with pytest.raises(PolicyError, match="RMSNorm weights of the Llama family and Gemma 3, not 'deepseek_v3'"):
        _engine("int4-g32-awq", model="synthetic:tiny-deepseek_v3")
    with pytest.raises(PolicyError, match="awq serves"):
        Policy.uniform(precision="bf16-awq")


def test_auto_refuses_awq_among_its_per_module_formats(capsys):
    from workbench.cli import main
    assert main(["eval", "--model", "synthetic:tiny-llama", "--precision", "auto", "--budget-bits", "5",
                 "--auto-formats", "int4-g32,int4-g32-awq"]) == 2
    err = capsys.readouterr().err
    assert "awq scales a norm's whole group" in err and len(err.strip().splitlines()) == 1
