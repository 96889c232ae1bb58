"""compressed-tensors export (`workbench.export.compressed_tensors`): the folder transformers loads through
the compressed-tensors package computes exactly the policy model's logits for every symmetric format, on
the Llama, Qwen2, Mistral and Gemma 3 families; asymmetric groups are refused or re-quantized on request;
bad input is one line with nothing written."""
import json
import os

import pytest
import torch

from workbench import Engine, Policy
from workbench.cli import main
from workbench.errors import InputError

pytest.importorskip("compressed_tensors")
from workbench.export import compressed_tensors as ct_export  # noqa: E402


def _engine(precision="int4-g32", model="synthetic:tiny-llama", **kw):
    return Engine.from_pretrained(model, device="cpu", policy=Policy.uniform(precision=precision, **kw))


def _read_back(engine, folder):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.tensor([engine.tokenizer("def export(model): return model.to('vllm')  # exact?")["input_ids"]])
    with torch.inference_mode():
        return model(ids).logits[0], engine.forward(ids)[0].float()


@pytest.mark.parametrize("precision, weights", [
    ("int4-g32", {"num_bits": 4, "strategy": "group", "group_size": 32}),
    ("int8", {"num_bits": 8, "strategy": "channel"}),
    ("int8-g32", {"num_bits": 8, "strategy": "group", "group_size": 32}),
    ("int3-g32", {"num_bits": 3, "strategy": "group", "group_size": 32}),
    ("int2-g64", {"num_bits": 2, "strategy": "group", "group_size": 64}),
    ("fp8", {"num_bits": 8, "strategy": "channel", "type": "float"}),
])
def test_symmetric_formats_read_back_exactly(tmp_path, precision, weights):
    engine = _engine(precision)
    report = ct_export.export_compressed_tensors(engine, tmp_path / "m", progress=False)
    assert report["config_groups"] == 1 and not report["requantized"]
    group = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert weights.items() <= group["weights"].items() and group["weights"]["symmetric"]
    assert r"re:^model\.layers\.\d+\.mlp\.down_proj$" in group["targets"]
    exported, policy = _read_back(engine, tmp_path / "m")
    assert torch.equal(exported, policy)


def test_the_default_model_exports_exactly_with_its_tokenizer(tmp_path):
    """Tied embeddings (an int8 table written dequantized, the head tied to it), grouped-query attention,
    its BPE tokenizer and chat template, and the held-out check that can tell int4 from the original."""
    from transformers import AutoTokenizer
    engine = _engine("int4-g64", model="default", head="int8")
    report = ct_export.export_compressed_tensors(engine, tmp_path / "m", progress=False)
    assert report["by_type"]["int4-g64"]["tensors"] == 210
    assert report["by_type"]["float32 (dequantized)"]["tensors"] == 1 and "lm_head" not in {
        r["name"] for r in report["tensors"]}
    exported, policy = _read_back(engine, tmp_path / "m")
    assert torch.equal(exported, policy)
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    text = "def f(x):\n    return x ** 2  # squared"
    assert tok(text)["input_ids"] == engine.tokenizer(text)["input_ids"]
    assert tok.chat_template == engine.tokenizer.chat_template
    check = ct_export.check_compressed_tensors(engine, tmp_path / "m", max_tokens=128)
    assert check["vs_policy"]["kld_mean"] < 1e-9 and check["vs_policy"]["top1"] == 1.0
    assert check["vs_reference"]["kld_mean"] > 1e-3


@pytest.mark.parametrize("model", ["synthetic:tiny-qwen2", "synthetic:tiny-mistral", "synthetic:tiny-gemma3"])
def test_other_architectures_export_exactly(tmp_path, model):
    """compressed-tensors names layers as transformers does: any architecture, biases kept as loaded."""
    engine = _engine(model=model, head="int8")
    ct_export.export_compressed_tensors(engine, tmp_path / "m", progress=False)
    exported, policy = _read_back(engine, tmp_path / "m")
    assert torch.equal(exported, policy)


def test_asymmetric_groups_are_refused_or_requantized_on_request(tmp_path):
    engine = _engine("int4-g32-asym")
    with pytest.raises(InputError, match="no exact compressed-tensors scheme"):
        ct_export.export_compressed_tensors(engine, tmp_path / "m", progress=False)
    assert not os.listdir(tmp_path)
    report = ct_export.export_compressed_tensors(engine, tmp_path / "m", allow_requantize=True, progress=False)
    assert len(report["requantized"]) == 14
    check = ct_export.check_compressed_tensors(engine, tmp_path / "m", max_tokens=64)
    assert 0 < check["vs_policy"]["kld_mean"] < 1e-2  # symmetric groups of 32 again: close, not equal


def test_a_mixture_gets_one_config_group_per_scheme_and_vllm_fusion_is_checked(tmp_path):
    from workbench.policy import parse_precision
    policy = (Policy.uniform(precision="int4-g32")
              .with_rule("model.layers.0.mlp.up_proj", weights=parse_precision("int8-g32"))
              .with_rule("role:down", weights=parse_precision("int8")))
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu", policy=policy)
    report = ct_export.export_compressed_tensors(engine, tmp_path / "m", progress=False)
    assert report["config_groups"] == 3
    assert report["vllm_fused_conflicts"] == ["model.layers.0.mlp.gate_proj|up_proj"]
    groups = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]["config_groups"]
    targets = {t for g in groups.values() for t in g["targets"]}
    assert r"re:^model\.layers\.\d+\.mlp\.down_proj$" in targets and "model.layers.0.mlp.up_proj" in targets
    assert "model.layers.1.mlp.up_proj" in targets  # layer 0's up_proj is not int4: no regex for up_proj
    exported, policy_logits = _read_back(engine, tmp_path / "m")
    assert torch.equal(exported, policy_logits)


def test_runtime_only_settings_need_weights_only_and_go_to_a_sidecar(tmp_path):
    engine = _engine("int4-g32", sparsity=0.5)
    with pytest.raises(InputError, match="weights-only"):
        ct_export.export_compressed_tensors(engine, tmp_path / "m", progress=False)
    report = ct_export.export_compressed_tensors(engine, tmp_path / "m", weights_only=True, progress=False)
    assert "activation sparsity (topk, 0.5 of the inputs)" in json.loads(open(report["sidecar"]).read())["runtime_only"]


def test_a_failure_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    engine = _engine()
    calls = []

    def broken(*args):
        calls.append(args[-1])
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(*args)
    real = ct_export.check_layer
    monkeypatch.setattr(ct_export, "check_layer", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        ct_export.export_compressed_tensors(engine, tmp_path / "m", progress=False)
    assert not os.listdir(tmp_path)


def test_cli_export_and_its_bad_inputs(tmp_path, capsys):
    out = tmp_path / "m"
    argv = ["export", "--model", "synthetic:tiny-llama", "--format", "compressed-tensors", "--precision", "int4-g32"]
    assert main([*argv, "--out", str(out), "--check-tokens", "64"]) == 0
    printed = capsys.readouterr().out
    assert "int4-g32" in printed and "KLD 0.00e+00 / top-1 1.000 against the policy model" in printed
    assert json.loads((tmp_path / "m.report.json").read_text())["check"]["vs_policy"]["top1"] == 1.0
    assert main([*argv, "--out", str(out), "--force", "--no-check"]) == 0  # an export may replace an export
    capsys.readouterr()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    for extra, message in (
            (["--out", str(out)], "exists: pass --force"),
            (["--out", str(tmp_path / "notes"), "--force"], "does not hold an export"),
            (["--out", str(tmp_path / "missing" / "m")], "does not exist"),
            (["--out", str(tmp_path / "n"), "--precision", "int4-g32-asym"], "no exact compressed-tensors")):
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "n").exists() and (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_engine_export_takes_the_format(tmp_path):
    report = _engine().export(tmp_path / "m", format="compressed-tensors", progress=False)
    assert report["check"]["vs_policy"]["kld_mean"] < 1e-9


def test_auto_can_keep_vllm_fused_layers_in_one_format(tmp_path):
    from workbench.formats.mixed_precision import fused, with_auto_precision
    from workbench.formats.sensitivity import scan
    engine = _engine("none")
    sens = scan(engine, ["int4-g32", "int8-g32"], tokens=32, progress=False)
    merged = fused(sens)
    assert "model.layers.0.self_attn.q_proj|k_proj|v_proj" in merged.units and len(merged.units) == 2 * 4
    qkv = merged.units["model.layers.0.self_attn.q_proj|k_proj|v_proj"]
    assert merged.kld["model.layers.0.self_attn.q_proj|k_proj|v_proj"]["int8-g32"] == pytest.approx(
        sum(sens.kld[u]["int8-g32"] for u, fqns in sens.units.items() if fqns[0] in qkv))
    engine.reconfigure(with_auto_precision(Policy.identity(), sens, budget_bits=6.0, keep_fused=True))
    report = ct_export.export_compressed_tensors(engine, tmp_path / "m", progress=False)
    assert report["config_groups"] == 2 and report["vllm_fused_conflicts"] == []  # a real mixture, vLLM-loadable
    exported, policy = _read_back(engine, tmp_path / "m")
    assert torch.equal(exported, policy)
