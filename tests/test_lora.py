"""LoRA through peft on plain and policy-wrapped layers: attach, merge per format, unload, bad input."""
import pytest
import torch

from workbench import Engine, InputError, Policy
from workbench.lora import attach_lora, lora_layers, merge, unload

POLICIES = [Policy.identity(), Policy.uniform(precision="int8"), Policy.uniform(0.3, "topk", "int4-g32"),
            Policy.uniform(precision="bf16")]


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
    assert not lora_layers(engine.model)
    if policy.is_identity:
        assert torch.allclose(merged, adapted, atol=1e-5) and report == {}
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
