"""Activation sparsity: rules, calibration, measured statistics, generality across architectures."""
import dataclasses

import pytest
import torch

from workbench import Engine, Policy, PolicyError
from workbench.sparsity.calibration import Calibration, histogram, threshold_from_histogram
from workbench.sparsity.calibrate import calibrate
from workbench.evaluate import evaluate
from workbench.sparsity.rules import keep_count, threshold_sparsify, topk_sparsify
from workbench.transforms import wrappers

RULES = ["topk", "threshold", "weighted", "greedy"]


@pytest.fixture(scope="module")
def llama_cal():
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    return calibrate(engine, tokens=1024, greedy=True, progress=False)


def test_topk_keeps_exactly_k_per_token():
    x = torch.randn(3, 5, 64)
    out = topk_sparsify(x, 10)
    assert ((out != 0).sum(-1) == 10).all()
    kept = out != 0
    # every kept magnitude is at least every dropped one, per token
    assert (x.abs().masked_fill(~kept, float("inf")).amin(-1) >= x.abs().masked_fill(kept, 0).amax(-1)).all()


def test_topk_with_ties_still_keeps_exactly_k():
    x = torch.zeros(2, 16)
    x[:, :3] = 1.0
    assert ((topk_sparsify(x, 8) != 0).sum(-1) <= 8).all()
    ties = torch.ones(2, 16)
    assert ((topk_sparsify(ties, 8) != 0).sum(-1) == 8).all()


def test_threshold_scalar_and_per_channel():
    x = torch.tensor([[-3.0, -0.5, 0.2, 2.0]])
    assert torch.equal(threshold_sparsify(x, 1.0), torch.tensor([[-3.0, 0.0, 0.0, 2.0]]))
    assert torch.equal(threshold_sparsify(x, torch.tensor([5.0, 0.1, 0.1, 5.0])), torch.tensor([[0.0, -0.5, 0.2, 0.0]]))


def test_histogram_threshold_inverts_the_cdf():
    values = torch.rand(200_000) * 10
    hist = histogram(values)
    for target in (0.1, 0.5, 0.9):
        t = threshold_from_histogram(hist, target)
        assert (values < t).float().mean().item() == pytest.approx(target, abs=0.01)


@pytest.mark.parametrize("rule", RULES)
def test_sparsity_zero_is_bit_identical_under_every_rule(rule, sample_ids, llama_cal):
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu", calibration=llama_cal)
    dense = engine.forward(sample_ids)
    engine.reconfigure(Policy.uniform(sparsity=0.0, rule=rule))
    assert torch.equal(engine.forward(sample_ids), dense)
    assert not list(wrappers(engine.model))


@pytest.mark.parametrize("rule", RULES)
def test_unwrap_restores_the_model(rule, sample_ids, llama_cal):
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu", calibration=llama_cal)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    dense = engine.forward(sample_ids)
    engine.reconfigure(Policy.uniform(sparsity=0.5, rule=rule))
    assert not torch.equal(engine.forward(sample_ids), dense)
    engine.unwrap()
    after = engine.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(engine.forward(sample_ids), dense)


def test_topk_measured_sparsity_is_what_stats_report(sample_ids):
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu",
                                    policy=Policy.uniform(sparsity=0.3, rule="topk"))
    engine.forward(sample_ids)
    stats = engine.stats()
    for m in stats["modules"]:
        if m.get("sparsity_rule") == "topk":
            d = engine.model.get_submodule(m["fqn"]).in_features
            assert m["achieved_sparsity"] == pytest.approx(1 - keep_count(d, 0.3) / d, abs=1e-12)
    assert stats["achieved_sparsity"]["overall"] == pytest.approx(0.3, abs=0.01)


@pytest.mark.parametrize("rule", ["threshold", "weighted", "greedy"])
def test_calibrated_rules_hit_their_target_on_held_out_text(rule, llama_cal):
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu", calibration=llama_cal,
                                    policy=Policy.uniform(sparsity=0.5, rule=rule))
    r = evaluate(engine, max_tokens=512, progress=False)
    sp = r["achieved_sparsity"]
    assert abs(sp["drift"]) < 0.05, sp  # tiny random model; the real-model figure is in the experiment
    assert r["kld_mean"] > 0


def test_greedy_allocation_is_recorded_and_monotone(llama_cal):
    path = llama_cal.for_module("model.layers.0.mlp.down_proj").greedy_path
    levels = [p[0] for p in path]
    assert levels[0] == 0.0 and levels == sorted(levels) and levels[-1] >= 0.8
    assert all(b[1] >= a[1] for a, b in zip(path, path[1:]))


def test_calibration_roundtrip_and_determinism(tmp_path, llama_cal):
    path = llama_cal.save(tmp_path / "cal.safetensors")
    loaded = Calibration.load(path)
    fqn = "model.layers.1.self_attn.q_proj"
    assert loaded.for_module(fqn).threshold(0.4) == llama_cal.for_module(fqn).threshold(0.4)
    assert loaded.for_module(fqn).greedy_path == [tuple(p) for p in llama_cal.for_module(fqn).greedy_path] \
        or loaded.for_module(fqn).greedy_path == [list(p) for p in llama_cal.for_module(fqn).greedy_path]
    again = calibrate(Engine.from_pretrained("synthetic:tiny-llama", device="cpu"), tokens=1024, progress=False)
    assert torch.equal(again.for_module(fqn).hist, llama_cal.for_module(fqn).hist)


def test_policy_with_artifact_for_another_model_is_refused(tmp_path, llama_cal):
    llama_cal.save(tmp_path / "cal.safetensors")
    policy = dataclasses.replace(Policy.uniform(sparsity=0.4, rule="threshold"), calibration="cal.safetensors")
    policy.save(tmp_path / "policy.json")
    loaded = Policy.load(tmp_path / "policy.json")
    assert loaded.calibration == str(tmp_path / "cal.safetensors")
    Engine.from_pretrained("synthetic:tiny-llama", device="cpu", policy=loaded)  # the right model: fine
    with pytest.raises(PolicyError, match="made for another model"):
        Engine.from_pretrained("synthetic:tiny-qwen2", device="cpu", policy=loaded)
    missing = dataclasses.replace(loaded, calibration=str(tmp_path / "missing.safetensors"))
    with pytest.raises(PolicyError, match="calibration artifact not found"):
        Engine.from_pretrained("synthetic:tiny-llama", device="cpu", policy=missing)


def test_a_failed_reconfigure_leaves_the_engine_as_it_was(tmp_path, sample_ids):
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu", policy=Policy.uniform(0.3, "topk"))
    out = engine.forward(sample_ids)
    bad = dataclasses.replace(Policy.uniform(0.5, "threshold"), calibration=str(tmp_path / "nope.safetensors"))
    with pytest.raises(PolicyError):
        engine.reconfigure(bad)
    assert engine.policy.name == "topk-0.30"
    assert torch.equal(engine.forward(sample_ids), out)


def test_prefill_is_dense_by_default_and_sparse_on_request():
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu", policy=Policy.uniform(0.5, "topk"))
    engine.generate(["a prompt of some length"], max_new_tokens=4)
    seen = next(w for _, w in wrappers(engine.model)).entries_seen
    d = next(w for _, w in wrappers(engine.model)).in_features
    assert seen == 3 * d  # only the 3 decode steps after the first token were sparse
    sparse_prefill = dataclasses.replace(Policy.uniform(0.5, "topk"), default=dataclasses.replace(
        Policy.uniform(0.5, "topk").default, sparsity=dataclasses.replace(
            Policy.uniform(0.5, "topk").default.sparsity, prefill=True)))
    engine.reconfigure(sparse_prefill)
    engine.generate(["a prompt of some length"], max_new_tokens=4)
    assert next(w for _, w in wrappers(engine.model)).entries_seen > 3 * d


def test_shared_inputs_are_sparsified_once_with_identical_results(sample_ids):
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu", policy=Policy.uniform(0.5, "topk"))
    shared = engine.forward(sample_ids)
    for _, w in wrappers(engine.model):
        w.input_cache = None  # every module computes its own mask
    assert torch.equal(engine.forward(sample_ids), shared)


@pytest.mark.parametrize("rule", ["topk", "threshold"])
def test_every_architecture_runs_sparse(tiny_name, rule, sample_ids):
    engine = Engine.from_pretrained(tiny_name, device="cpu")
    if rule == "threshold":
        engine.reconfigure(Policy.identity(), calibration=calibrate(engine, tokens=256, progress=False))
    dense = engine.forward(sample_ids)
    engine.reconfigure(Policy.uniform(sparsity=0.5, rule=rule))
    sparse = engine.forward(sample_ids)
    assert sparse.shape == dense.shape and torch.isfinite(sparse).all()
    assert not torch.equal(sparse, dense)
    sp = engine.stats()["achieved_sparsity"]
    assert 0.3 < sp["overall"] < 0.7
    roles = set(sp["by_role"])
    assert roles >= {"o", "gate", "up", "down"}


def test_calibrating_under_the_policy_measures_each_layer_as_it_runs(llama_cal):
    """Round 1 sees the first layer's inputs unchanged (nothing is sparse upstream of them) and every later
    layer's inputs as the policy's upstream cuts leave them; the engine's policy comes back afterwards."""
    from workbench.sparsity.calibrate import calibrate_under
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu", calibration=llama_cal)
    policy = Policy.uniform(sparsity=0.5, rule="threshold")
    under = calibrate_under(engine, policy, rounds=1, tokens=1024, progress=False)
    assert engine.policy.is_identity and engine.calibration is llama_cal
    assert under.meta["under"] == policy.name and under.meta["rounds"] == "1"
    first, later = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"
    assert torch.equal(under.for_module(first).hist, llama_cal.for_module(first).hist)
    assert not torch.equal(under.for_module(later).hist, llama_cal.for_module(later).hist)
    engine.reconfigure(policy, calibration=under)
    r = evaluate(engine, max_tokens=512, progress=False)
    assert abs(r["achieved_sparsity"]["drift"]) < 0.05


def test_calibrating_under_a_policy_without_a_calibrated_rule_is_refused():
    from workbench.sparsity.calibrate import calibrate_under
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    with pytest.raises(PolicyError, match="no calibrated sparsity rule"):
        calibrate_under(engine, Policy.uniform(sparsity=0.5, rule="topk"), progress=False)
    with pytest.raises(PolicyError, match="at least one round"):
        calibrate_under(engine, Policy.uniform(sparsity=0.5, rule="threshold"), rounds=0, progress=False)
