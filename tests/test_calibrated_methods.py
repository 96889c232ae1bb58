"""Every calibrated rounding method on a tiny model of every architecture: the same packed format and bytes
as round-to-nearest, other rounded values, a model that still runs next to the reference; awq where its
scales cannot fold into a norm (DeepSeek's MLA) is one line and leaves the model as it was."""
import pytest
import torch

from workbench import Engine, Policy, PolicyError


@pytest.mark.parametrize("method", ["gptq", "imatrix", "awq"])
def test_each_method_on_every_tiny_architecture(tiny_name, method, sample_ids):
    engine = Engine.from_pretrained(tiny_name, device="cpu")
    reference = engine.reference_logits(sample_ids)
    engine.reconfigure(Policy.uniform(precision="int4-g32"))
    rounded, rounded_bytes = engine.forward(sample_ids), engine.stats()["weight_bytes"]
    if method == "awq" and "deepseek" in tiny_name:
        with pytest.raises(PolicyError, match="RMSNorm weights of the Llama family and Gemma 3"):
            engine.reconfigure(Policy.uniform(precision="int4-g32-awq"))
        assert engine.policy.name == "int4-g32" and torch.equal(engine.forward(sample_ids), rounded)
        return
    engine.reconfigure(Policy.uniform(precision=f"int4-g32-{method}"))
    calibrated = engine.forward(sample_ids)
    assert engine.stats()["weight_bytes"] == rounded_bytes  # the same packed format, other values
    assert torch.isfinite(calibrated).all() and not torch.equal(calibrated, rounded)
    cos = torch.nn.functional.cosine_similarity(calibrated.float(), reference.float(), dim=-1)
    assert cos.mean() > 0.9, cos.mean()
