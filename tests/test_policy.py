import json
import re

import pytest

from workbench import Attention, Policy, PolicyError, Rule, Setting, Sparsity, Weights
from workbench.policy import parse_attention, parse_precision


def test_identity_policy_roundtrips_and_is_identity():
    p = Policy.identity()
    assert p.is_identity
    assert Policy.from_json(p.to_json()) == p


def test_rules_roundtrip_and_first_match_wins():
    s = Setting(attention=Attention("topk", budget=64))
    p = Policy(rules=(Rule("role:down", s), Rule("re:layers\\.0\\.", Setting())), name="mixed")
    q = Policy.from_json(p.to_json())
    assert q == p
    assert q.setting_for("model.layers.0.mlp.down_proj", "down") == s  # first rule wins over the second
    assert q.setting_for("model.layers.0.mlp.up_proj", "up") == Setting()


def test_rule_kinds_match_as_documented():
    assert Rule("model.layers.1*.mlp.*", Setting()).matches("model.layers.12.mlp.up_proj", "up")
    assert not Rule("model.layers.1*.mlp.*", Setting()).matches("model.layers.2.mlp.up_proj", "up")
    assert Rule("re:\\.(q|k)_proj$", Setting()).matches("model.layers.0.self_attn.k_proj", "k")
    assert Rule("role:q, v", Setting()).matches("x", "v")
    assert not Rule("role:q,v", Setting()).matches("x", None)


def test_default_applies_to_block_roles_only():
    p = Policy(default=Setting(attention=Attention("topk", budget=0.5)))
    assert p.setting_for("model.layers.0.mlp.down_proj", "down") == p.default
    assert p.setting_for("lm_head", "lm_head") == Setting()
    assert p.setting_for("model.layers.0.mlp.gate", "router") == Setting()


def test_json_rules_inherit_missing_sections_from_default():
    data = {"default": {"attention": {"selector": "topk", "budget": 32}},
            "rules": [{"match": "role:o", "weights": {"format": "none"}}]}
    p = Policy.from_dict(data)
    assert p.rules[0].setting.attention.budget == 32


@pytest.mark.parametrize("bad, message", [
    ({"default": {"sparsity": {"rule": "nope"}}}, "unknown sparsity rule 'nope'"),
    ({"default": {"sparsity": {"rule": "dense", "target": 1.5}}}, "[0, 1)"),
    ({"default": {"weights": {"format": "int5"}}}, "unknown weight format 'int5'"),
    ({"default": {"weights": {"format": "none", "group_size": 0}}}, "group_size"),
    ({"default": {"attention": {"selector": "dense", "budget": 0}}}, "key count must be >= 1"),
    ({"default": {"attention": {"selector": "dense", "budget": 1.5}}}, "(0, 1]"),
    ({"default": {"speed": {}}}, "unknown key(s) in policy.default: speed"),
    ({"rules": [{"setting": {}}]}, "rules[0]"),
    ({"rules": [{"match": "re:("}]}, "not a valid regex"),
    ({"version": 99}, "version 99"),
    ([1, 2], "must be a JSON object"),
])
def test_invalid_policies_name_the_problem(bad, message):
    with pytest.raises(PolicyError) as err:
        Policy.from_dict(bad)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_malformed_json_is_a_policy_error():
    with pytest.raises(PolicyError, match="not valid JSON"):
        Policy.from_json("{not json")


def test_missing_file_is_a_policy_error(tmp_path):
    with pytest.raises(PolicyError, match="not found"):
        Policy.load(tmp_path / "missing.json")


def test_save_load(tmp_path):
    p = Policy(rules=(Rule("role:q", Setting()),), name="x")
    p.save(tmp_path / "p.json")
    assert Policy.load(tmp_path / "p.json") == p
    assert json.loads((tmp_path / "p.json").read_text())["version"] == 1


def test_dense_rule_refuses_a_target():
    with pytest.raises(PolicyError, match="'dense' takes target 0"):
        Sparsity("dense", 0.3)


def test_shorthand_parsers():
    assert parse_precision("none") == Weights()
    assert parse_attention("dense") == Attention()
    with pytest.raises(PolicyError, match="unknown weight format"):
        parse_precision("int9-g64")
    with pytest.raises(PolicyError, match="cannot parse precision"):
        parse_precision("none-x7")
    with pytest.raises(PolicyError, match="unknown attention selector 'nope'"):
        parse_attention("nope:3")
    with pytest.raises(PolicyError, match="sparsity must be in"):
        Policy.uniform(sparsity=-0.1)


@pytest.mark.parametrize("text, rule, target, fmt, selector, head", [
    ("dense", "dense", 0.0, "none", "dense", None),
    ("threshold50+int8", "threshold", 0.5, "int8", "dense", "int8"),
    ("topk25+int4-g64", "topk", 0.25, "int4-g64", "dense", "int4-g64"),
    ("int8+head:none", "dense", 0.0, "int8", "dense", None),
    ("int4-g32+head:int8", "dense", 0.0, "int4-g32", "dense", "int8"),
    ("topk30+window:4+256", "topk", 0.3, "none", "window", None),
])
def test_one_shorthand_grammar(text, rule, target, fmt, selector, head):
    p = Policy.parse(text)
    assert p.name == text and Policy.from_json(p.to_json()) == p
    d = p.default
    assert (d.sparsity.rule, d.sparsity.target, d.weights.label, d.attention.selector) == (rule, target, fmt, selector)
    heads = [r.setting.weights.label for r in p.rules if r.match == "role:lm_head,embed"]
    assert heads == ([head] if head else [])


@pytest.mark.parametrize("text, message", [
    ("topk100", "must be below 100%"), ("int5", "unknown weight format 'int5'"), ("", "non-empty"),
    ("int8+", "empty part"), ("nope:3", "unknown attention selector"), ("head:int9", "unknown weight format"),
])
def test_shorthand_errors_name_the_part(text, message):
    with pytest.raises(PolicyError, match=re.escape(message)):
        Policy.parse(text)
