import json

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
