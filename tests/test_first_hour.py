"""What a newcomer meets in the first hour: hub ids, devices, per-layer format fallbacks, memory figures
that match the process, module tables, progress in logs, and one clear line for every bad path."""
import json
import os
import subprocess
import sys
import time

import pytest

from workbench import Engine, Policy
from workbench.cli import main
from workbench.errors import ModelError, PolicyError
from workbench.models import load


def one_line_error(capsys, argv, expect: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("workbench: error:") and expect in err, err


def test_a_hub_id_is_an_id_and_fails_offline_in_one_quick_line(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    import importlib

    import huggingface_hub.constants
    importlib.reload(huggingface_hub.constants)
    try:
        for name in ("HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"):
            t0 = time.perf_counter()
            with pytest.raises(ModelError, match="hub id.*cannot be reached") as e:
                load(name, device="cpu")
            assert time.perf_counter() - t0 < 10 and "\n" not in str(e.value)
    finally:
        monkeypatch.delenv("HF_ENDPOINT")
        importlib.reload(huggingface_hub.constants)
    with pytest.raises(ModelError, match="model path not found"):
        load("./org/name", device="cpu")  # a path, not an id


def test_devices_this_machine_lacks_are_one_line(capsys):
    import torch
    if not torch.cuda.is_available():
        one_line_error(capsys, ["info", "--model", "synthetic:tiny-llama", "--device", "cuda"], "no CUDA device")
    one_line_error(capsys, ["info", "--model", "synthetic:tiny-llama", "--device", "tpu"], "unknown device 'tpu'")


def test_paths_that_are_not_files(capsys, tmp_path):
    one_line_error(capsys, ["info", "--model", "synthetic:tiny-llama", "--policy", str(tmp_path)],
                   "is not a regular file")
    one_line_error(capsys, ["eval", "--model", "synthetic:tiny-llama", "--corpus", "/dev/null"],
                   "is not one")


def test_info_modules_prints_the_table_and_survives_a_closed_pipe(capsys):
    assert main(["info", "--model", "synthetic:tiny-llama", "--precision", "int8", "--modules"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in out and "int8" in out.split("model.layers.0.mlp.up_proj")[1]
    proc = subprocess.run(f"{sys.executable} -m workbench.cli info --model synthetic:tiny-llama --json --modules"
                          " | head -c 10", shell=True, capture_output=True, text=True, timeout=120)
    assert proc.stdout and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_a_model_wide_format_falls_back_per_layer_and_says_so(capsys):
    engine = Engine.from_pretrained("synthetic:smollm2-135m", device="cpu")  # hidden 576, MLP 1536
    engine.reconfigure(Policy.uniform(precision="int4-g128"))
    facts = engine.stats()
    formats = {m["fqn"]: m["format"] for m in facts["modules"]}
    assert formats["model.layers.0.self_attn.q_proj"] == "int4-g64"  # 576 = 4.5 x 128
    assert formats["model.layers.0.mlp.down_proj"] == "int4-g128"  # 1536 = 12 x 128
    assert "model.layers.0.mlp.up_proj" in facts["fallbacks"] and "down_proj" not in " ".join(facts["fallbacks"])
    assert "int4-g128 -> int4-g64" in facts["fallbacks"]["model.layers.0.mlp.up_proj"]
    with pytest.raises(PolicyError, match="not a multiple of the group size 128"):  # a rule naming modules refuses
        engine.reconfigure(Policy.identity().with_rule("model.layers.0.mlp.up_proj",
                                                       weights=Policy.uniform(precision="int4-g128").default.weights))
    mla = Engine.from_pretrained("synthetic:tiny-deepseek_v3", device="cpu")
    mla.reconfigure(Policy.uniform(precision="int4-g32"))
    assert mla.stats()["fallbacks"]["model.layers.0.self_attn.kv_b_proj"].startswith("int4-g32 -> int8 (its 16 input")
    assert main(["info", "--model", "synthetic:tiny-deepseek_v3", "--precision", "int4-g32"]) == 0
    assert "fallback model.layers.0.self_attn.kv_b_proj: int4-g32 -> int8" in capsys.readouterr().out


RSS_SCRIPT = """
import json, os, sys
from workbench import Engine, Policy
Engine.from_pretrained("synthetic:tiny-llama")  # imports and warms the modelling code before the baseline
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
base = rss()
engine = Engine.from_pretrained("default", policy=Policy.uniform(precision="int8"), keep_reference=False)
lean = engine.stats()
print(json.dumps({"rss": rss() - base, "held": lean["held_bytes"], "reference": lean["reference_bytes"]}))
"""


@pytest.mark.slow
def test_a_lean_engine_holds_what_it_reports():
    """keep_reference=False must free the originals for real: resident memory ~ the bytes stats() reports."""
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT], capture_output=True, text=True, timeout=600)
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = 2 ** 20
    assert facts["reference"] == 0
    assert abs(facts["rss"] - facts["held"]) < 80 * mib, (facts["rss"] / mib, facts["held"] / mib)


def test_the_switch_cache_is_counted():
    engine = Engine.from_pretrained("synthetic:smollm2-135m", device="cpu")
    engine.reconfigure(Policy.uniform(precision="int8"))
    int8 = engine.stats()["weight_bytes"] - engine.stats()["weight_bytes_by_format"].get("float32", 0)
    engine.reconfigure(Policy.uniform(precision="int4-g64"))
    engine.reconfigure(Policy.identity())
    facts = engine.stats()
    assert facts["switch_cache_bytes"] > int8  # the int8 and the int4 packs, kept for instant switching
    assert facts["held_bytes"] == facts["weight_bytes"] + facts["reference_bytes"] + facts["switch_cache_bytes"]


def test_long_work_reports_progress_as_lines_when_stderr_is_not_a_terminal():
    code = ("from workbench import Engine; from workbench.evaluate import evaluate;"
            "import workbench.progress as p; p.LINE_EVERY_S = 0.0;"
            "evaluate(Engine.from_pretrained('synthetic:tiny-llama'), max_tokens=256, seq_len=32)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, TRANSFORMERS_VERBOSITY="error"))
    lines = [line for line in proc.stderr.splitlines() if line.startswith("evaluating:")]
    assert lines and lines[-1].startswith("evaluating: 9/9 window (100%)") and lines[-1].endswith("done")
