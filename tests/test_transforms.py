import torch

from workbench import Engine, Policy
from workbench.transforms import apply_policy, unwrap, wrappers


def test_identity_policy_gives_bit_identical_logits(tiny_name, sample_ids):
    from workbench.models import load
    plain = load(tiny_name, device="cpu").model
    expected = plain(sample_ids).logits
    engine = Engine.from_pretrained(tiny_name, policy=Policy.identity(), device="cpu")
    assert torch.equal(engine.forward(sample_ids), expected.float())
    assert torch.equal(engine.reference_logits(sample_ids), expected.float())


def test_identity_wraps_nothing(tiny_engine):
    before = dict(tiny_engine.model.named_modules())
    apply_policy(tiny_engine.model, Policy.identity())
    assert not list(wrappers(tiny_engine.model))
    assert dict(tiny_engine.model.named_modules()) == before  # the very same module objects


def test_unwrap_restores_state_dict(tiny_engine, sample_ids):
    model = tiny_engine.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logits = model(sample_ids).logits
    apply_policy(model, Policy.uniform(0.3, "topk", "int8"))
    assert len(list(wrappers(model))) > 0 and not torch.equal(model(sample_ids).logits, logits)
    unwrap(model)
    after = model.state_dict()
    assert not list(wrappers(model)) and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model(sample_ids).logits, logits)
    assert not hasattr(model, "workbench_policy")


def test_padding_does_not_change_logits(sample_ids):
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    ids = sample_ids[:1, :10]
    alone = engine.forward(ids)[0, -1]
    padded = torch.cat([torch.full((1, 4), 258), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    assert torch.allclose(engine.forward(padded, mask)[0, -1], alone, atol=1e-5)
