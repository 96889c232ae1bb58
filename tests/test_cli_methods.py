import json

import pytest

from workbench.cli import main


def test_eval_reports_achieved_sparsity_by_role(capsys):
    assert main(["eval", "--model", "synthetic:tiny-llama", "--sparsity", "0.4", "--sparsity-rule", "topk",
                 "--max-tokens", "128", "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    sp = out["achieved_sparsity"]
    assert abs(sp["overall"] - 0.4) < 0.01
    assert set(sp["by_role"]) == {"q", "k", "v", "o", "gate", "up", "down"}


def test_calibrate_writes_an_artifact_that_eval_uses(tmp_path, capsys):
    out = tmp_path / "cal.safetensors"
    assert main(["calibrate", "--model", "synthetic:tiny-llama", "--tokens", "256", "--out", str(out), "--json",
                 "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["path"] == str(out) and summary["modules"] == 14
    assert main(["eval", "--model", "synthetic:tiny-llama", "--sparsity", "0.5", "--sparsity-rule", "threshold",
                 "--calibration", str(out), "--max-tokens", "128", "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["achieved_sparsity"]["overall"] > 0.3


def test_missing_calibration_file_is_one_line(capsys):
    assert main(["eval", "--model", "synthetic:tiny-llama", "--sparsity", "0.5", "--sparsity-rule", "threshold",
                 "--calibration", "/no/such.safetensors"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["workbench: error: calibration artifact not found: /no/such.safetensors"]


def test_eval_with_a_precision_reports_bytes_by_format(capsys):
    assert main(["eval", "--model", "synthetic:tiny-llama", "--precision", "int4-g32", "--max-tokens", "64",
                 "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kld_mean"] > 0 and "int4-g32" in out["weight_bytes_by_format"]
    assert out["reference_bytes"] > 0


def test_info_auto_precision_under_a_budget(capsys):
    assert main(["info", "--model", "synthetic:tiny-llama", "--precision", "auto", "--budget-bits", "6",
                 "--json", "--modules", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    block = [m for m in out["modules"] if m["role"] != "lm_head"]
    assert sum(m["weight_bytes"] for m in block) * 8 / sum(m["params"] for m in block) <= 6.0
    assert out["policy"].startswith("auto(")


def test_sensitivity_command_json(capsys):
    assert main(["sensitivity", "--model", "synthetic:tiny-llama", "--granularity", "layer", "--formats",
                 "int8,int4-g32", "--tokens", "32", "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["kld"]) == {"layer0", "layer1"} and out["formats"] == ["int8", "int4-g32"]


@pytest.mark.parametrize("argv, message", [
    (["--precision", "auto"], "--precision auto needs --budget-bits"),
    (["--precision", "int8", "--budget-bits", "4"], "--budget-bits goes with --precision auto"),
    (["--precision", "auto", "--budget-bits", "1"], "below the smallest possible size"),
    (["--precision", "int4-g48"], "int4 group size must be one of"),
])
def test_bad_precision_arguments(argv, message, capsys):
    assert main(["info", "--model", "synthetic:tiny-llama", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_model_wide_formats_a_layer_cannot_take_fall_back_and_are_listed(capsys):
    from workbench.cli import main
    assert main(["info", "--model", "synthetic:tiny-llama", "--precision", "int4-g256",
                 "--head-precision", "int8-block32"]) == 0
    out = capsys.readouterr().out
    assert "fallback model.layers.0.self_attn.q_proj: int4-g256 -> int4-g64 (its 64 input features" in out
    assert "fallback lm_head: int8-block32 -> int8" in out
