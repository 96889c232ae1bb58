"""The LoRA demonstrations on the real default model (short runs), and `workbench finetune`."""
import json
import sys

import pytest
import torch

from workbench import Engine, Policy
from workbench.cli import main
from workbench.lora import attach_lora, load_adapter, train, unload
from workbench.lora_tasks import corpus_chunks, date_cases, exact_match


def test_date_cases_are_well_formed_and_train_and_test_never_share_a_date():
    train_cases, test_cases = date_cases(300, "train"), date_cases(100, "test")
    assert not {c.prompt for c in train_cases} & {c.prompt for c in test_cases}
    for c in train_cases[:20] + test_cases[:20]:
        year, month, day = map(int, c.answer.split("-"))
        assert c.prompt.endswith(f", {year}") and f" {day}, " in c.prompt and 1 <= month <= 12
    assert date_cases(5, "test") == date_cases(5, "test")  # seeded: the same cases on every machine


def test_the_skill_task_loss_falls_on_the_default_model(default_engine):
    """The date task, a short run: the same batch every step (8 conversations, batch 8), so the loss
    must fall; and the answers are scored by exact match."""
    cases = date_cases(8, "train")
    try:
        attach_lora(default_engine, r=8, alpha=16, targets=("q", "v"))
        result = train(default_engine, [c.conversation() for c in cases], steps=4, lr=2e-3, batch=8, warmup=0,
                       progress=False)
        assert result.losses[-1] < 0.7 * result.losses[0], result.losses
        scored = exact_match(default_engine, date_cases(4, "test"))
        assert scored["cases"] == 4 and 0 <= scored["accuracy"] <= 1
        assert all(s["got"] and s["expected"].count("-") == 2 for s in scored["samples"])
    finally:
        unload(default_engine)


def test_the_recovery_task_pulls_the_compressed_model_toward_the_reference(default_engine):
    chunks = corpus_chunks("calibration", limit=4)
    assert len(chunks) == 4 and all(len(c) >= 500 for c in chunks)
    default_engine.reconfigure(Policy.uniform(0.5, "topk", "int4-g64"))
    try:
        attach_lora(default_engine, r=8, alpha=16, targets="all-linear")
        result = train(default_engine, chunks, steps=3, lr=2e-3, batch=4, max_len=64, loss="kl", warmup=0,
                       progress=False)
        assert result.losses[-1] < result.losses[0], result.losses
    finally:
        unload(default_engine)
        default_engine.reconfigure(Policy.identity())


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_finetune_saves_an_adapter_that_loads(tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [{"text": "abcabcabcabcabc"}, {"text": "xyzxyzxyzxyz"}] * 3)
    argv = ["finetune", "--model", "synthetic:tiny-llama", "--device", "cpu", "--data", data, "--steps", "3",
            "--out", str(tmp_path / "a"), "--precision", "int8", "--targets", "all-linear", "--lr", "1e-3", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 3 and out["tokens"] > 0 and out["policy"] == "int8" and out["tokens_per_s"] > 0
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu", policy=Policy.uniform(precision="int8"))
    handle = load_adapter(engine, tmp_path / "a")
    assert handle.trainable == out["trainable_params"]
    assert main(argv) == 2  # the folder already holds an adapter: nothing is overwritten
    assert "already holds an adapter" in capsys.readouterr().err


@pytest.mark.parametrize("rows, extra, message", [
    (None, [], "dataset not found"),
    ([], [], "is empty"),
    (["not json"], [], ":1: not JSON"),
    ([{"prompt": "x"}], [], "needs a \"text\" or a \"messages\""),
    ([{"text": "abc"}], ["--steps", "0"], "--steps"),
    ([{"text": "abc"}], ["--lr", "-1"], "--lr must be positive"),
    ([{"text": "abc"}], ["--rank", "0"], "rank r must be a positive integer"),
    ([{"text": "abc"}], ["--targets", "nope"], "match no module"),
    ([{"text": "abc"}], ["--loss", "mse"], "invalid choice"),
])
def test_finetune_bad_input_is_one_line_and_exit_2(tmp_path, rows, extra, message, capsys):
    path = tmp_path / "d.jsonl"
    if rows is not None:
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main(["finetune", "--model", "synthetic:tiny-llama", "--device", "cpu", "--data", str(path),
                       "--out", str(tmp_path / "a"), *extra]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "a" / "adapter.json").exists()
