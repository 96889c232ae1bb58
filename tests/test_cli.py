"""The command line: JSON output, and one line + exit code 2 for every bad input."""
import json
import subprocess
import sys

import pytest

from workbench.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workbench.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_info_json_on_a_synthetic_model(capsys):
    assert main(["info", "--model", "synthetic:tiny-qwen2", "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["architecture"]["model_type"] == "qwen2"
    assert out["weight_bytes"] == out["fp32_bytes"]
    assert out["policy"] == "identity"


def test_eval_json_keys(capsys):
    assert main(["eval", "--model", "synthetic:tiny-llama", "--json", "--max-tokens", "64", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("perplexity", "kld_mean", "kld_p99", "top1", "tokens", "python"):
        assert key in out
    assert out["tokens"] == 64 and out["kld_mean"] == 0.0 and out["top1"] == 1.0


def test_generate_prints_text(capsys):
    assert main(["generate", "--model", "synthetic:tiny-llama", "hello", "--max-new-tokens", "3",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.endswith("\n")


BAD_INPUTS = [
    (["info", "--model", "./missing/model"], "model path not found"),
    (["info", "--model", "synthetic:nope"], "unknown synthetic model"),
    (["eval", "--model", "synthetic:tiny-llama", "--sparsity", "1.5"], "sparsity must be in [0, 1)"),
    (["eval", "--model", "synthetic:tiny-llama", "--sparsity", "abc"], "invalid float value"),
    (["eval", "--model", "synthetic:tiny-llama", "--sparsity-rule", "nope", "--sparsity", "0.3"],
     "unknown sparsity rule 'nope'"),
    (["eval", "--model", "synthetic:tiny-llama", "--precision", "int5"], "unknown weight format 'int5'"),
    (["eval", "--model", "synthetic:tiny-llama", "--precision", "int3-g48"], "int3 group size must be one of"),
    (["calibrate", "--model", "synthetic:tiny-llama", "--under", "threshold40"], "--under needs --out FILE"),
    (["calibrate", "--model", "synthetic:tiny-llama", "--under", "topk40", "--out", "x.safetensors"],
     "the policy has no calibrated sparsity rule"),
    (["calibrate", "--model", "synthetic:tiny-llama", "--under", "threshold40", "--out", "x.safetensors", "--rounds",
      "0"], "--rounds must be at least 1"),
    (["calibrate", "--model", "synthetic:tiny-llama", "--under", "threshold4O", "--out", "x.safetensors"], "threshold4O"),
    (["eval", "--model", "synthetic:tiny-llama", "--precision", "int8", "--auto-formats", "int8"],
     "--auto-formats goes with --precision auto"),
    (["eval", "--model", "synthetic:tiny-llama", "--precision", "auto", "--budget-bits", "5", "--auto-formats",
      "int4-g32,int9"], "unknown weight format 'int9'"),
    (["eval", "--model", "synthetic:tiny-llama", "--precision", "auto", "--budget-bits", "5", "--auto-formats",
      ",,"], "--auto-formats needs at least one format"),
    (["eval", "--model", "synthetic:tiny-llama", "--attention", "nope"], "unknown attention selector"),
    (["eval", "--model", "synthetic:tiny-llama", "--max-tokens", "0"], "--max-tokens must be a positive"),
    (["eval", "--model", "synthetic:tiny-llama", "--corpus", "/no/such.txt"], "corpus file not found"),
    (["generate", "--model", "synthetic:tiny-llama", "x", "--max-new-tokens", "100000"], "exceeds the model's"),
    (["generate", "--model", "synthetic:tiny-llama", ""], "prompt is empty"),
    (["info", "--policy", "/no/such/policy.json"], "policy file not found"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main(argv))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert message in lines[0]
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"default": {"sparsity": {"rule": "dense", "target": 2}}}', "[0, 1)"),
    ('{"default": {"weights": {"format": "int5"}}}', "unknown weight format"),
    ("[]", "must be a JSON object"),
])
def test_bad_policy_files(tmp_path, content, message, capsys):
    f = tmp_path / "policy.json"
    f.write_text(content)
    assert main(["info", "--model", "synthetic:tiny-llama", "--policy", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_console_script_in_a_subprocess():
    """The installed entry point, as a user runs it: no traceback, exit 2, one line."""
    proc = run_cli("eval", "--model", "/definitely/missing")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["workbench: error: model path not found: /definitely/missing"]
