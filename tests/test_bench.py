"""`workbench bench`: the policy matrix runs on CPU (small model, short run) and reports what it measured."""
import importlib.util
import json
import subprocess
import sys

import pytest

from workbench import PolicyError
from workbench.policy import Policy
from workbench.cli import main
from workbench.viz import speed_figure

SMALL = ["--model", "synthetic:tiny-llama", "--prompt-tokens", "8", "--new-tokens", "5", "--device", "cpu"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "workbench.cli", "bench", *SMALL, "--policies",
                           "dense,topk50,int8,int4-g32,topk50+int8", "--batch", "1,2", "--json", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == printed  # --out holds the same result
    return printed


def test_every_policy_and_batch_is_timed(result):
    rows = {(r["policy"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {(p, b) for p in ("dense", "topk50", "int8", "int4-g32", "topk50+int8") for b in (1, 2)}
    for r in rows.values():
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and r["roofline_ms"] > 0 and r["peak_bytes"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["ms_per_step"])
    for (policy, batch), row in rows.items():  # each speed-up is dense's time over the policy's, same batch
        assert row["speedup_vs_dense"] == pytest.approx(rows[("dense", batch)]["ms_per_step"] / row["ms_per_step"])
    assert result["transformers_eager_ms"] > 0 and result["dense_speedup_vs_transformers"] > 0
    assert result["environment"]["copy_bandwidth_gb_s"] > 0 and result["environment"]["device"] == "cpu"


def test_measured_facts_follow_the_policy(result):
    rows = {(r["policy"], r["batch"]): r for r in result["rows"]}
    assert rows[("topk50", 1)]["achieved_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert rows[("dense", 1)]["achieved_sparsity"] is None
    dense, int8, int4 = (rows[(p, 1)]["weight_bytes"] for p in ("dense", "int8", "int4-g32"))
    assert int4 < int8 < dense  # formats cover the head too: fewer bytes stored and read
    assert rows[("topk50", 1)]["roofline_ms"] < rows[("dense", 1)]["roofline_ms"]  # skipped columns not read
    assert rows[("topk50", 2)]["roofline_ms"] >= rows[("dense", 2)]["roofline_ms"] * 0.99  # a batch reads the union


def test_table_output_and_figure(capsys, result):
    assert main(["bench", *SMALL, "--policies", "dense", "--batch", "1", "--no-transformers"]) == 0
    out = capsys.readouterr().out
    assert "ms/step" in out and "dense" in out and "roofline" in out
    fig = speed_figure(result)
    bars = [t for t in fig.data if t.type == "bar"]
    assert [len(t.y) for t in bars] == [5, 5] and all(y > 0 for t in bars for y in t.y)


@pytest.mark.parametrize("name, sparsity, rule, fmt", [
    ("dense", 0.0, None, None), ("int4-g64", 0.0, None, "int4"), ("topk25", 0.25, "topk", None),
    ("threshold50+int8", 0.5, "threshold", "int8")])
def test_policy_names(name, sparsity, rule, fmt):
    p = Policy.parse(name)
    assert p.name == name and p.default.sparsity.target == sparsity
    assert (p.default.sparsity.rule if sparsity else None) == rule
    assert (None if p.default.weights.is_identity else p.default.weights.format) == fmt


@pytest.mark.parametrize("args, message", [
    (["--policies", "dense,int3"], "int3"),
    (["--policies", "topk100"], "sparsity"),
    (["--batch", "one"], "--batch takes comma-separated integers"),
    (["--batch", "0"], "batch sizes must be positive"),
    (["--new-tokens", "2"], "--new-tokens >= 3"),
    (["--model", "synthetic:phi3-tiny"], "decode loop"),
    (["--context", "8q"], "--context takes comma-separated token counts"),
    (["--context", "1k"], "a context of 1024 tokens + 5 new ones exceeds synthetic:tiny-llama's maximum of 512"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    assert main(["bench", *SMALL, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_requests_on_a_cpu_machine(capsys):
    assert main(["bench", *SMALL, "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert main(["bench", *SMALL, "--policies", "dense", "--batch", "1", "--no-transformers", "--kernels", "triton"]) == 0
    captured = capsys.readouterr()
    assert "Triton kernels need a CUDA device; timed the CPU reference paths instead" in captured.err
    assert "dense" in captured.out


def test_bench_policy_errors_are_one_line_policy_errors():
    with pytest.raises(PolicyError, match="must be below 100%"):
        Policy.parse("topk150")


def test_pdl_is_a_gpu_launch_mode(monkeypatch):
    """Programmatic dependent launch exists only on sm_90+ GPUs: off on a CPU and with WORKBENCH_PDL=0,
    and `--pdl both` on a CPU times each row once (there is nothing to launch either way)."""
    from workbench.bench import run_bench
    if importlib.util.find_spec("triton") is not None:  # the kernels (and this switch) need Triton
        from workbench.kernels import pdl
        assert pdl.launch_kwargs("cpu") == {"PDL": False}
        monkeypatch.setenv("WORKBENCH_PDL", "0")
        assert not pdl.enabled("cuda:0")
    result = run_bench("synthetic:tiny-llama", ("dense",), (1,), 8, 4, transformers_baseline=False, device="cpu",
                       pdl="both")
    assert [(r["policy"], r["pdl"]) for r in result["rows"]] == [("dense", False)] and result["pdl"] == "n/a"
    with pytest.raises(Exception, match="--pdl takes one of"):
        run_bench("synthetic:tiny-llama", ("dense",), (1,), 8, 4, transformers_baseline=False, device="cpu", pdl="x")


def test_every_row_is_timed_at_each_context():
    """`--context`: each policy and batch at each prompt length, each against dense at the same context;
    a longer context reads more KV cache per step (its roofline grows), an attention selector is a policy."""
    from workbench.bench import format_table, parse_contexts, run_bench
    assert parse_contexts("8k, 128k,300") == (8192, 131072, 300)
    result = run_bench("synthetic:tiny-llama", ("dense", "topk:16"), (1, 2), new_tokens=4, transformers_baseline=False,
                       device="cpu", contexts=(32, 256))
    rows = {(r["policy"], r["batch"], r["context"]): r for r in result["rows"]}
    assert set(rows) == {(p, b, c) for p in ("dense", "topk:16") for b in (1, 2) for c in (32, 256)}
    for (policy, batch, context), row in rows.items():
        assert row["speedup_vs_dense"] == pytest.approx(rows[("dense", batch, context)]["ms_per_step"]
                                                        / row["ms_per_step"])
    assert rows[("dense", 1, 256)]["roofline_ms"] > rows[("dense", 1, 32)]["roofline_ms"]
    assert result["contexts"] == [32, 256] and "contexts 32, 256" in format_table(result)
