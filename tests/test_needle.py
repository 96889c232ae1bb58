"""The needle-in-a-haystack probe (`attention.needle`): one point per (length, depth, code, policy), the
engine's policy put back, a budget that covers the whole context exactly dense, bad lengths and depths one
line, and its figure (a heat map per length)."""
import math

import pytest

from workbench import Engine, InputError, Policy
from workbench.attention.needle import needle_policies, needle_probe, needle_summary
from workbench.viz import needle_figure


@pytest.fixture(scope="module")
def probed():
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    engine.reconfigure(Policy.parse("int8"))
    result = needle_probe(engine, lengths=(320, 448), depths=(0.1, 0.5), codes=1, budgets=(16, 500))
    return engine, result


def test_every_point_is_measured_and_the_policy_is_put_back(probed):
    engine, result = probed
    policies = needle_policies((16, 500))
    assert [p["policy"] for p in result["points"]] == policies * 4  # 2 lengths x 2 depths x 1 code
    for p in result["points"]:
        assert isinstance(p["found"], bool) and math.isfinite(p["logprob"]) and p["logprob"] <= 0
        if p["policy"] == "dense":
            assert p["recall"] is None  # nothing selected, nothing measured
        else:
            assert 0 < p["recall"] <= 1 + 1e-6, p
    assert engine.policy.name == "int8"
    rows = {(r["length"], r["policy"]): r for r in needle_summary(result)}
    assert rows[(320, "dense")]["n"] == 2 and 0 <= rows[(320, "dense")]["found_rate"] <= 1


def test_a_budget_covering_the_context_is_exactly_dense(probed):
    _, result = probed
    dense = {(p["length"], p["depth"]): p["logprob"] for p in result["points"] if p["policy"] == "dense"}
    for p in result["points"]:
        if p["policy"] in ("topk:500", "indexer:500", "block:500"):
            assert p["logprob"] == pytest.approx(dense[p["length"], p["depth"]], abs=1e-5), p
        if p["policy"] == "topk:16":
            assert p["recall"] < 1.0  # 16 keys of ~300-450: the selection drops attention mass


def test_figure_has_a_heat_map_per_length(probed):
    _, result = probed
    fig = needle_figure(result)
    maps = [t for t in fig.data if t.type == "heatmap"]
    assert len(maps) == 2 and [list(t.x) for t in maps] == [["16", "500"]] * 2
    assert list(maps[0].y) == ["topk", "indexer", "block", "window", "hierarchical"]
    assert "dense: " in fig.layout.annotations[0].text


def test_bad_lengths_and_depths_are_one_line():
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    with pytest.raises(InputError, match="exceeds the model's 512 positions"):
        needle_probe(engine, lengths=(1024,))
    with pytest.raises(InputError, match=r"shares of the document in \[0, 1\)"):
        needle_probe(engine, lengths=(256,), depths=(1.5,))
    with pytest.raises(InputError, match="it needs at least 64"):
        needle_probe(engine, lengths=(40,), depths=(0.1,))
