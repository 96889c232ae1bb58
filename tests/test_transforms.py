import torch

from workbench import Engine, Policy
from workbench.transforms import apply_policy, unwrap


def test_identity_policy_gives_bit_identical_logits(tiny_name, sample_ids):
    from workbench.models import load
    plain = load(tiny_name, device="cpu").model
    expected = plain(sample_ids).logits
    engine = Engine.from_pretrained(tiny_name, policy=Policy.identity(), device="cpu")
    assert torch.equal(engine.forward(sample_ids), expected.float())
    assert torch.equal(engine.reference_logits(sample_ids), expected.float())


def test_unwrap_restores_state_dict(tiny_engine, sample_ids):
    before = {k: v.clone() for k, v in tiny_engine.model.state_dict().items()}
    apply_policy(tiny_engine.model, Policy.identity())
    unwrap(tiny_engine.model)
    after = tiny_engine.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(tiny_engine.model, "workbench_policy")


def test_padding_does_not_change_logits(sample_ids):
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    ids = sample_ids[:1, :10]
    alone = engine.forward(ids)[0, -1]
    padded = torch.cat([torch.full((1, 4), 258), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    assert torch.allclose(engine.forward(padded, mask)[0, -1], alone, atol=1e-5)
