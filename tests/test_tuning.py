"""The launch-config tuner's bookkeeping (timing itself needs CUDA: tests/test_dispatch_gpu.py)."""
import json

from workbench.kernels import tuning


def _fresh(monkeypatch, path):
    monkeypatch.setenv("WORKBENCH_TUNING_CACHE", str(path))
    monkeypatch.setattr(tuning, "_DISK", None)
    monkeypatch.setattr(tuning, "_BEST", {})


def test_a_choice_saved_on_disk_is_reused_by_a_later_process(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    _fresh(monkeypatch, path)
    key = ("gemv_int8", 16, 1, 4096, 4096, "torch.bfloat16")
    tuning._remember_on_disk(key, {"block_n": 64, "split": 2})
    assert len(json.loads(path.read_text())) == 1
    _fresh(monkeypatch, path)  # a new process: nothing in memory
    launched = []
    cfg = tuning.tuned(key, [{"block_n": 128, "split": 1}, {"block_n": 64, "split": 2}], launched.append)
    assert cfg == {"block_n": 64, "split": 2} and not launched and tuning.remembered(key) == cfg


def test_a_saved_choice_that_is_no_longer_a_candidate_is_not_used(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    _fresh(monkeypatch, path)
    tuning._remember_on_disk("k", {"block_n": 512})
    _fresh(monkeypatch, path)
    assert tuning.tuned("k", [{"block_n": 128}], lambda c: None) == {"block_n": 128}  # CPU: the first


def test_an_unreadable_cache_means_tuning_afresh(tmp_path, monkeypatch, caplog):
    path = tmp_path / "tuning.json"
    path.write_text("{not json")
    _fresh(monkeypatch, path)
    assert tuning.tuned("k", [{"a": 1}], lambda c: None) == {"a": 1}
    assert "unreadable" in caplog.text
