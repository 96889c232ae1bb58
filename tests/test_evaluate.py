import math

import pytest
import torch

from workbench import Engine, InputError
from workbench.corpus import corpus_split, pydoc_topics, token_windows, topic_names
from workbench.evaluate import compare_logits, evaluate
from workbench.synthetic import byte_tokenizer


def test_corpus_split_is_deterministic_and_disjoint():
    held, cal = corpus_split("heldout"), corpus_split("calibration")
    assert held == corpus_split("heldout")
    assert len(held) > 50_000 and len(cal) > 200_000
    held_names, cal_names = topic_names("heldout"), topic_names("calibration")
    assert not set(held_names) & set(cal_names)
    assert sorted(held_names + cal_names) == sorted(pydoc_topics())


def test_compare_logits_against_hand_computed_values():
    ref = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    mod = torch.log(torch.tensor([[0.25, 0.5, 0.25]]))
    out = compare_logits(ref, mod, torch.tensor([1]))
    expected_kl = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    assert out["kld"].item() == pytest.approx(expected_kl, rel=1e-5)
    assert out["same_top1"].item() == 0.0
    assert out["nll"].item() == pytest.approx(-math.log(0.5), rel=1e-5)
    assert out["ref_nll"].item() == pytest.approx(-math.log(0.25), rel=1e-5)


def test_windows_bound_scored_tokens():
    tok = byte_tokenizer()
    windows = token_windows(tok, "x" * 1000, seq_len=100, max_tokens=250)
    assert sum(len(w) - 1 for w in windows) == 250
    assert all(len(w) <= 100 for w in windows)
    with pytest.raises(InputError, match="too short"):
        token_windows(tok, "x", seq_len=100, max_tokens=10)


def test_identity_evaluation_is_exact_zero():
    engine = Engine.from_pretrained("synthetic:tiny-mistral", device="cpu")
    r = evaluate(engine, max_tokens=300, seq_len=128, progress=False)
    assert r["kld_mean"] == 0.0 and r["kld_p99"] == 0.0 and r["top1"] == 1.0
    assert r["tokens"] == 300 and r["perplexity"] == r["reference_perplexity"]
    assert r["python"] and "pydoc_data.topics:heldout" in r["corpus"]


def test_text_file_corpus_and_errors(tmp_path):
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    f = tmp_path / "text.txt"
    f.write_text("the quick brown fox jumps over the lazy dog " * 20)
    assert evaluate(engine, corpus=str(f), max_tokens=100, progress=False)["tokens"] == 100
    with pytest.raises(InputError, match="not found"):
        evaluate(engine, corpus=str(tmp_path / "nope.txt"), progress=False)
    (tmp_path / "empty.txt").write_text("  ")
    with pytest.raises(InputError, match="empty"):
        evaluate(engine, corpus=str(tmp_path / "empty.txt"), progress=False)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InputError, match="not UTF-8"):
        evaluate(engine, corpus=str(tmp_path / "bin.txt"), progress=False)
