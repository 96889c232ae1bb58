"""The serving benchmark: workloads, the CPU run on the default model (small), and bad flags."""
import json
import math
import sys

import pytest

from workbench.cli import main
from workbench.loadtest import make_workload, summarise


def test_a_workload_is_poisson_and_reproducible(default_engine):
    a = make_workload(default_engine.tokenizer, 200, rate=10.0, prompt_tokens=20, output_tokens=8, seed=3)
    b = make_workload(default_engine.tokenizer, 200, rate=10.0, prompt_tokens=20, output_tokens=8, seed=3)
    assert a == b
    gaps = [y.arrival_s - x.arrival_s for x, y in zip(a, a[1:])]
    assert all(g >= 0 for g in gaps) and 0.07 < sum(gaps) / len(gaps) < 0.13  # mean gap 1 / rate
    assert all(10 <= len(w.prompt_ids) <= 30 and 4 <= w.max_new_tokens <= 12 for w in a)
    burst = make_workload(default_engine.tokenizer, 5, rate=math.inf)
    assert {w.arrival_s for w in burst} == {0.0}


def test_goodput_counts_only_requests_within_both_slos():
    done = [{"ttft_s": 0.1, "e2e_s": 1.0, "completion_tokens": 10},   # TPOT 0.1: good
            {"ttft_s": 3.0, "e2e_s": 4.0, "completion_tokens": 10},   # TTFT too long
            {"ttft_s": 0.1, "e2e_s": 5.0, "completion_tokens": 10}]   # TPOT 0.54: too slow
    s = summarise(done, seconds=2.0, slo_ttft_s=1.0, slo_tpot_s=0.2)
    assert s["goodput_rps"] == 0.5 and s["slo_met"] == pytest.approx(1 / 3) and s["requests_per_s"] == 1.5


def test_the_cpu_benchmark_runs_every_mode_on_the_default_model(tmp_path, capsys):
    out = tmp_path / "serving.json"
    assert main(["loadtest", "--requests", "4", "--prompt-tokens", "16", "--output-tokens", "6", "--max-num-seqs", "4",
                 "--rates", "50", "--ladder", "dense,topk50", "--control-period", "0.05", "--device", "cpu",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    modes = [r["mode"] for r in result["rows"]]
    assert modes == ["one-at-a-time", "continuous", "transformers", "continuous", "fixed", "elastic"]
    for row in result["rows"]:
        assert "error" not in row, row
        expected = 8 if row["mode"] in ("fixed", "elastic") else 4
        assert row["requests"] == expected and row.get("refused", 0) == 0  # nothing lost
    assert result["rows"][0]["slots"] == 1 and result["rows"][1]["slots"] == 4
    assert set(result["ladder_kld"]) == {"dense", "topk50"} and result["ladder_kld"]["dense"] == 0.0
    assert result["ladder_kld"]["topk50"] > 0
    assert set(result["rows"][-1]["policies"]) <= {"dense", "topk50"}  # each response names its policy levels
    assert result["continuous_vs_one_at_a_time"] > 0
    printed = capsys.readouterr().out
    if result["rows"][-1]["decisions"]:  # a gain only where the controller moved
        assert "elastic goodput gain" in printed and result["elastic_decisions"] > 0
    else:
        assert "no rung taken" in printed and result["elastic_goodput_gain"] is None


def test_no_decision_reports_no_rung_instead_of_a_gain():
    from workbench.loadtest import elastic_summary
    fixed, elastic = {"goodput_rps": 1.0}, {"goodput_rps": 1.56, "decisions": []}
    assert elastic_summary(fixed, elastic)["elastic_goodput_gain"] is None
    assert "no rung taken" in elastic_summary(fixed, elastic)["elastic_note"]
    moved = dict(elastic, decisions=[{"to": "topk50"}])
    assert elastic_summary(fixed, moved) == {"elastic_goodput_gain": 1.56, "elastic_decisions": 1}


@pytest.mark.parametrize("argv, message", [
    (["loadtest", "--rates", "1,x"], "--rates takes comma-separated numbers"),
    (["loadtest", "--rates", "0"], "every --rates value must be positive"),
    (["loadtest", "--modes", "warp"], "--modes takes some of"),
    (["loadtest", "--requests", "0"], "must be positive"),
    (["loadtest", "--overload", "-1"], "must be positive"),
    (["loadtest", "--ladder", "dense,topk200"], "topk200"),
    (["serve", "--port", "70000"], "--port must be in 1..65535"),
    (["serve", "--max-num-seqs", "0"], "--max-num-seqs must be positive"),
    (["serve", "--elastic", "--ladder", "nope"], "nope"),
])
def test_bad_serving_flags_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main([*argv, "--model", "synthetic:tiny-llama", "--device", "cpu"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
