"""GPTQ (`formats.gptq`, `formats.hessians`, the `gptq` method of the policy): exact where the math says
so, better than round-to-nearest where it should be (measured on a real layer), and one clear line on
bad input."""
import pytest
import torch

from workbench import Engine, Policy, PolicyError
from workbench.cli import main
from workbench.formats.gptq import gptq_quantize
from workbench.formats.quant import (dequantize_grouped, dequantize_int4, quantize_grouped, quantize_int4,
                                    quantize_int8_channel)
from workbench.policy import Weights, parse_precision


@pytest.mark.parametrize("spec", [Weights("int4", 32), Weights("int4", 64, symmetric=False), Weights("int8"),
                                  Weights("int3", 64), Weights("int2", 32, symmetric=False)])
def test_with_uncorrelated_inputs_gptq_is_round_to_nearest(spec):
    """H = I: no column's error has anywhere to go, so GPTQ keeps RTN's codes exactly (same scales)."""
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    got = gptq_quantize(w, torch.eye(128), spec)
    want = quantize_int8_channel(w) if spec.format == "int8" else \
        quantize_grouped(w, int(spec.format[3]), spec.group_size, spec.symmetric)
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("spec", [Weights("int4", 32), Weights("int3", 32), Weights("int2", 32, symmetric=False)])
def test_gptq_lowers_the_output_error_on_correlated_inputs(spec):
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(96, 96, generator=g)
    x = torch.randn(4096, 96, generator=g) @ mix  # correlated inputs, as real activations are
    w = torch.randn(64, 96, generator=g)
    bits = int(spec.format[3])
    rtn = dequantize_grouped(quantize_grouped(w, bits, 32, spec.symmetric), bits)
    gq = dequantize_grouped(gptq_quantize(w, x.T @ x, spec), bits)
    err = lambda wq: (x @ (w - wq).T).pow(2).mean().item()  # noqa: E731
    assert err(gq) < 0.7 * err(rtn), (err(gq), err(rtn))


@pytest.mark.slow
def test_gptq_beats_rtn_on_a_real_layer_of_the_default_model():
    """Hessian from calibration text, error measured on held-out text's inputs to the same layer."""
    from workbench.corpus import load_text, token_windows
    from workbench.formats.hessians import collect_hessians
    from workbench.sparsity.calibration import input_hooks
    engine = Engine.from_pretrained("default")
    fqn = "model.layers.6.mlp.down_proj"
    h, tokens = collect_hessians(engine, [fqn], tokens=8192, progress=False)[fqn]
    layer = engine.model.get_submodule(fqn)
    assert tokens >= 8192 and h.shape == (layer.in_features, layer.in_features)
    held = []
    text, _ = load_text(None, "heldout")
    with input_hooks([(fqn, layer)], lambda f, m, x: held.append(x.reshape(-1, x.shape[-1]).float())):
        for window in token_windows(engine.tokenizer, text, 256, 1024):
            engine.forward(window[None])
    x, w = torch.cat(held), layer.weight.float()
    spec = Weights("int4", 64)
    err = lambda wq: (x @ (w - wq).T).pow(2).mean().item()  # noqa: E731
    e_rtn = err(dequantize_int4(quantize_int4(w, 64)))
    e_gptq = err(dequantize_int4(gptq_quantize(w, h, spec)))
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)  # measured 0.61x (act order, 8192 tokens)


def test_the_method_is_part_of_the_precision_and_round_trips():
    spec = parse_precision("int4-g64-asym-gptq")
    assert (spec.format, spec.group_size, spec.symmetric, spec.method) == ("int4", 64, False, "gptq")
    assert spec.label == "int4-g64-asym-gptq" and parse_precision("int8").method == "rtn"
    policy = Policy.parse("threshold40+int4-g64-gptq")
    assert Policy.from_json(policy.to_json()) == policy
    assert policy.default.weights.method == "gptq"
    sparse = Policy.parse("threshold40+int4-g64-gptq-sparsecal")
    assert sparse.default.weights.calibrate_sparse and Policy.from_json(sparse.to_json()) == sparse
    with pytest.raises(PolicyError, match="calibrate_sparse goes with a calibrated method"):
        parse_precision("int4-g64-sparsecal")


def test_an_engine_under_gptq_decodes_and_packs_other_bytes_than_rtn():
    engine = Engine.from_pretrained("synthetic:tiny-llama", policy=Policy.parse("int4-g32-gptq"))
    assert engine.generate(["hello"], max_new_tokens=4)[0]
    layer = engine.model.get_submodule("model.layers.0.mlp.down_proj")
    rtn = quantize_int4(layer.base.weight.detach(), 32)
    assert layer.store.spec.method == "gptq" and not torch.equal(layer.store.tensors["q"], rtn["q"])
    assert torch.equal(layer.store.tensors["scale"], rtn["scale"])  # static groups: RTN's own scales
    assert "model.embed_tokens" in engine.model.workbench_fallbacks  # a lookup table stays rtn, said once
    engine.reconfigure(Policy.parse("int4-g32"))
    engine.reconfigure(Policy.parse("int4-g32-gptq"))  # the packed GPTQ weights come back from the cache
    assert engine.model.get_submodule("model.layers.0.mlp.down_proj").store is layer.store


@pytest.mark.parametrize("text, message", [("bf16-gptq", "gptq serves int4/int3/int2 groups and per-row int8, not bf16"),
                                           ("int8-block64-gptq", "not int8 with blocks of 64"),
                                           ("int4-g64-awq2", "METHOD one of")])
def test_a_method_a_format_cannot_take_is_one_line(text, message):
    with pytest.raises(PolicyError, match=message):
        parse_precision(text)


def test_too_little_calibration_text_for_the_hessian_is_refused():
    from workbench.formats.hessians import collect_hessians
    engine = Engine.from_pretrained("synthetic:tiny-llama")
    fqn = "model.layers.0.mlp.down_proj"
    with pytest.raises(PolicyError, match="calibration tokens for .* inputs"):
        collect_hessians(engine, [fqn], tokens=8, seq_len=8, progress=False)


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "synthetic:tiny-llama", "--quant-method", "gptq"], "needs a --precision"),
    (["eval", "--model", "synthetic:tiny-llama", "--precision", "bf16", "--quant-method", "gptq"], "not bf16"),
    (["eval", "--model", "synthetic:tiny-llama", "--precision", "int4-g32", "--quant-method", "best"],
     "--quant-method takes one of"),
    (["eval", "--model", "synthetic:tiny-llama", "--precision", "int4-g32", "--calibrate-sparse"],
     "--calibrate-sparse goes with a calibrated --quant-method"),
])
def test_cli_refuses_bad_methods_in_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_sparsified_layer_is_calibrated_on_the_inputs_it_will_get():
    """Under threshold40 + GPTQ-sparsecal each sparsified layer's Hessian is of its inputs after its own
    cut, against the unmodified model's dense inputs by default: other packed weights for the sparsified
    layers, the same for the head (no sparsity), and both remembered side by side."""
    from workbench.formats.hessians import collect_hessians
    from workbench.transforms import wrappers
    engine = Engine.from_pretrained("synthetic:tiny-llama")
    q0 = "model.layers.0.self_attn.q_proj"  # nothing sparsified upstream: the same inputs before its cut
    engine.reconfigure(Policy.parse("threshold40"))
    h_cut, _ = collect_hessians(engine, [q0], progress=False, sparsified=True)[q0]
    h_dense, _ = collect_hessians(engine, [q0], progress=False)[q0]
    assert (h_cut.diagonal() <= h_dense.diagonal() * (1 + 1e-5)).all()
    # a 40% cut drops the smallest inputs: a few percent of the energy (4% measured), not nothing
    assert 0.8 * h_dense.diagonal().sum() < h_cut.diagonal().sum() < 0.99 * h_dense.diagonal().sum()

    def packed(name):
        engine.reconfigure(Policy.parse(name))
        return {fqn: w.store for fqn, w in wrappers(engine.model) if w.store is not None}
    as_run, dense = packed("threshold40+int4-g32-gptq-sparsecal"), packed("threshold40+int4-g32-gptq")
    differ = {f for f in as_run if not torch.equal(as_run[f].tensors["q"], dense[f].tensors["q"])}
    assert differ == {f for f in as_run if f.startswith("model.layers.")}
    assert engine.policy.default.weights.label == "int4-g32-gptq"
    assert packed("threshold40+int4-g32-gptq-sparsecal")[q0] is as_run[q0]  # served from the store cache, not recalibrated


def test_merging_an_update_into_a_gptq_layer_rounds_to_nearest_and_says_so():
    engine = Engine.from_pretrained("synthetic:tiny-llama", policy=Policy.parse("int4-g32-gptq"))
    layer = engine.model.get_submodule("model.layers.0.mlp.down_proj")
    report = layer.merge_delta(torch.zeros(layer.out_features, layer.in_features))
    assert report["method"] == "rtn" and layer.store.spec.method == "rtn"  # no Hessian at merge time


def test_a_layer_that_falls_back_to_a_smaller_group_keeps_its_method():
    from workbench.transforms import plan
    engine = Engine.from_pretrained("synthetic:tiny-llama")
    width = engine.model.get_submodule("model.layers.0.mlp.down_proj").in_features
    group = next(g for g in (256, 128, 64) if width % g)  # a group this layer cannot take
    labels = {s.setting.weights.label for s in plan(engine.model, Policy.uniform(precision=f"int4-g{group}-gptq"))
              if s.fallback}
    assert labels and all(label.endswith("-gptq") for label in labels), labels


def test_calibration_hessians_are_cached_per_model_and_refused_for_another(tmp_path, monkeypatch):
    """The first calibrated policy collects every linear layer's Hessian and saves them; the next one (any
    method, any format) reads the file without running the model; another model's file is refused."""
    from workbench.formats import hessians
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    fqns = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    first = hessians.cached_hessians(engine, fqns, tokens=2048, progress=False)
    files = list((tmp_path / "hessians").glob("*.safetensors"))
    assert len(files) == 1
    fresh = hessians.collect_hessians(engine, fqns, tokens=2048, progress=False)
    for fqn in fqns:
        assert torch.equal(first[fqn][0], fresh[fqn][0]) and first[fqn][1] == fresh[fqn][1]
    monkeypatch.setattr(engine, "forward", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran the model")))
    again = hessians.cached_hessians(engine, ["model.layers.1.self_attn.o_proj"] + fqns, tokens=2048, progress=False)
    assert torch.equal(again[fqns[0]][0], first[fqns[0]][0])
    assert again[fqns[0]][0].data_ptr() == again[fqns[1]][0].data_ptr()  # q and k read one input: one matrix
    with pytest.raises(PolicyError, match="were made for another model"):
        hessians.load_hessians(files[0], "0" * 16)


def test_auto_chooses_among_methods_and_takes_the_calibrated_variant_at_equal_bytes(tmp_path, monkeypatch):
    """The scan measures int4-g32 and int4-g32-gptq per module (one Hessian pass, cached); GPTQ's KLD is
    lower at the same bytes there, so `auto` spends the budget on the GPTQ variant."""
    from workbench.formats.mixed_precision import with_auto_precision
    from workbench.formats.sensitivity import scan
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    s = scan(engine, ["int4-g32", "int4-g32-gptq", "int8"], "module", 64, progress=False)
    assert all(s.bytes[u]["int4-g32"] == s.bytes[u]["int4-g32-gptq"] for u in s.units)
    better = [u for u in s.units if s.kld[u]["int4-g32-gptq"] < s.kld[u]["int4-g32"]]
    assert len(better) > len(s.units) // 2  # measured: GPTQ lowers most modules' KLD
    engine.reconfigure(with_auto_precision(Policy.identity(), s, budget_bits=4.6))
    chosen = {m["fqn"]: m for m in engine.stats()["modules"] if m["fqn"] in s.units}
    assert all(chosen[u]["format"] != "int4-g32" for u in better)  # formats name their method: int4-g32-gptq
    assert sum(m["format"] == "int4-g32-gptq" for m in chosen.values()) >= len(better) // 2
    assert torch.isfinite(engine.forward(torch.tensor([[1, 2, 3, 4]]))).all()
