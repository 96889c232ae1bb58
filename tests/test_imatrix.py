"""Importance-weighted rounding (`formats.imatrix`, the `imatrix` method): round-to-nearest when every input
channel matters alike, a lower output error where they do not, one clear line on bad input."""
import pytest
import torch

from workbench import Engine, Policy, PolicyError
from workbench.cli import main
from workbench.formats.imatrix import imatrix_quantize
from workbench.formats.quant import dequantize_grouped, quantize_grouped
from workbench.policy import Weights, parse_precision


@pytest.mark.parametrize("spec", [Weights("int4", 32), Weights("int3", 64), Weights("int2", 32, symmetric=False)])
def test_equal_importance_is_round_to_nearest(spec):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    bits = int(spec.format[3])
    got = imatrix_quantize(w, 5.0 * torch.eye(128), spec)
    want = quantize_grouped(w, bits, spec.group_size, spec.symmetric)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("spec", [Weights("int4", 64), Weights("int3", 64), Weights("int2", 64, symmetric=False)])
def test_weighting_by_activations_lowers_the_output_error(spec):
    """Inputs whose channels differ in scale (as real activations do, a few channels large): the scales
    chosen for the weighted error give a smaller output error than plain round-to-nearest."""
    g = torch.Generator().manual_seed(2)
    scales = torch.exp(torch.randn(256, generator=g) * 1.2)
    x = torch.randn(4096, 256, generator=g) * scales
    w = torch.randn(64, 256, generator=g)
    bits = int(spec.format[3])
    rtn = dequantize_grouped(quantize_grouped(w, bits, 64, spec.symmetric), bits)
    imx = dequantize_grouped(imatrix_quantize(w, x.T @ x, spec), bits)
    err = lambda wq: (x @ (w - wq).T).pow(2).mean().item()  # noqa: E731
    assert err(imx) < 0.95 * err(rtn), (err(imx), err(rtn))


def test_an_engine_under_imatrix_keeps_the_format_and_chooses_other_scales(sample_ids):
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    engine.reconfigure(Policy.uniform(precision="int3-g32"))
    rtn = {m["fqn"]: m for m in engine.stats()["modules"]}
    scale_rtn = engine.model.get_submodule("model.layers.0.mlp.down_proj").store.scale.clone()
    engine.reconfigure(Policy.uniform(precision="int3-g32-imatrix"))
    store = engine.model.get_submodule("model.layers.0.mlp.down_proj").store
    assert store.scale.shape == scale_rtn.shape and engine.policy.default.weights.method == "imatrix"
    assert not torch.equal(store.scale, scale_rtn)  # the calibration inputs moved some group's scale
    assert torch.isfinite(engine.forward(sample_ids)).all()
    assert sum(m["weight_bytes"] for m in engine.stats()["modules"]) == sum(m["weight_bytes"] for m in rtn.values())
    assert Policy.from_json(engine.policy.to_json()).default.weights == parse_precision("int3-g32-imatrix")


@pytest.mark.parametrize("text, message", [("int8-imatrix", "imatrix serves int4/int3/int2 groups, not int8"),
                                           ("bf16-imatrix", "imatrix serves int4/int3/int2 groups, not bf16")])
def test_a_format_imatrix_cannot_serve_is_one_line(text, message):
    with pytest.raises(PolicyError, match=message):
        parse_precision(text)


def test_cli_refuses_imatrix_on_int8_in_one_line(capsys):
    assert main(["eval", "--model", "synthetic:tiny-llama", "--precision", "int8", "--quant-method", "imatrix"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["workbench: error: imatrix serves int4/int3/int2 groups, not int8"]
