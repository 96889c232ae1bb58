"""Panel logic in the kernel: moving a control changes the engine's policy and the figures' data."""
import re

import numpy as np
import pytest
import torch

from workbench import Engine
from workbench.policy import parse_precision
from workbench.widgets import AttentionExplorer, PrecisionTuner, SparsityTuner


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("synthetic:smollm2-135m", device="cpu")


def test_sparsity_tuner_follows_the_slider(engine):
    tuner = SparsityTuner(engine, prompt="a short prompt about sparse inference", max_new_tokens=4)
    assert engine.policy.is_identity and tuner.timings
    before = np.array(tuner.figure.data[0].z, dtype=float)
    assert before.max() == 0.0  # dense: nothing zeroed
    tuner.sparsity.value = 0.5
    tuner.wait()
    assert engine.policy.name == "topk-0.50"
    after = np.array(tuner.figure.data[0].z, dtype=float)
    assert after.shape == before.shape and abs(after.mean() - 0.5) < 0.02
    assert "wb-metric-kld" in tuner.metrics.value and "0.0000" not in tuner.metrics.value.split("kld")[1][:60]
    assert "wb-generated" in tuner.text.value and "wb-idle" in tuner.status.value
    tuner.layer_sliders[2].value = 0.9
    tuner.wait()
    z = np.array(tuner.figure.data[0].z, dtype=float)
    assert abs(z[2].mean() - 0.9) < 0.02 and abs(z[3].mean() - 0.5) < 0.02
    assert len(tuner.timings) == 3


def test_a_failing_update_is_shown_in_the_panel(engine):
    tuner = SparsityTuner(engine, prompt="another prompt", max_new_tokens=2, per_layer=False)
    tuner.rule.value = "threshold"  # needs a calibration: computed once and cached
    tuner.sparsity.value = 0.3
    tuner.wait()
    assert "wb-idle" in tuner.status.value, tuner.status.value
    broken = tuner.prober
    tuner.prober = None  # any failure inside an update
    tuner.sparsity.value = 0.4
    assert "wb-error" in tuner.status.value  # a red line, not a dead widget
    tuner.prober = broken
    tuner.sparsity.value = 0.2
    tuner.wait()
    assert "wb-idle" in tuner.status.value  # and the panel keeps working


def test_precision_tuner_moves_the_memory_bar(engine):
    tuner = PrecisionTuner(engine, prompt="weights in fewer bits", max_new_tokens=2)
    full = tuner.figure.data[0].x[0]
    tuner.format.value = "int8"
    tuner.wait()
    assert engine.policy.name == "int8"
    assert tuner.figure.data[0].x[0] < 0.5 * full
    tuner.layer_formats[0].value = "int4-g32"
    tuner.wait()
    assert len(engine.policy.rules) == 1 and tuner.figure.data[0].x[0] < 0.5 * full


def test_attention_explorer_shows_selection_and_recall(engine):
    explorer = AttentionExplorer(engine, prompt="one two three four five six seven eight nine ten " * 3)
    recall = lambda: float(re.search(r"recall</b> <span class='wb-value'>([0-9.]+)<", explorer.metrics.value).group(1))
    assert engine.policy.default.attention.selector == "topk" and 0 < recall() < 1  # a quarter of the keys
    explorer.selector.value = "dense"
    assert recall() == 1.0  # dense keeps every key
    explorer.selector.value = "topk"
    explorer.budget.value = 0.1
    assert engine.policy.default.attention.selector == "topk"
    dropped = np.array(explorer.figure.data[1].z, dtype=float)
    assert np.isfinite(dropped).any()  # some keys with attention mass are dropped and drawn in red
    explorer.selector.value = "window"
    assert "wb-idle" in explorer.status.value
    explorer.layer.value = 1
    assert "layer 1" in explorer.figure.layout.title.text


def test_lora_trainer_runs_stops_and_compares_answers():
    from workbench.lora import lora_layers
    from workbench.widgets import LoRATrainer
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    data = ["abcabcabcabcabcabc", "xyzxyzxyzxyzxyz"] * 4
    trainer = LoRATrainer(engine, data, prompts=["abcab", "xyzxy"], expected=["c", "z"], steps=6, lr=3e-3, batch=4,
                          max_new_tokens=2)
    trainer.targets.value = "all linear"
    trainer.start.click()
    trainer.wait()
    assert "wb-idle" in trainer.status.value, trainer.status.value
    assert list(trainer.figure.data[0].x) == [1, 2, 3, 4, 5, 6] and len(trainer.figure.data[0].y) == 6
    assert trainer.progress.value == 6 and trainer.result.steps == 6 and lora_layers(engine.model)
    assert "wb-metric-exact_match" in trainer.metrics.value and len(trainer.after) == 2
    assert trainer.answers.value.count("<tr>") == 3  # header + one row per prompt, before and after
    assert trainer.start.disabled is False and trainer.stop.disabled is True
    # a second run starts fresh adapters; Stop ends it after the current step
    trainer.steps.value = 200
    trainer.run()
    trainer.stop.click()  # ends the run after the current step
    trainer.wait()
    assert trainer.result.stopped and trainer.result.steps < 200
    trainer.rank.value = 4
    trainer.alpha.value = -1  # bad settings: a red line in the panel, the panel still usable
    trainer.run()
    trainer.wait()
    assert "wb-error" in trainer.status.value and "alpha" in trainer.status.value
    assert trainer.start.disabled is False


def test_scheduler_dashboard_plots_a_load_run():
    from workbench.widgets import SchedulerDashboard
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    dash = SchedulerDashboard(engine, max_num_seqs=2, requests=6, rate=16.0, prompt_tokens=8, output_tokens=64,
                              sample_s=0.05, control_period_s=0.1)
    dash.start.click()
    dash.wait()
    assert "wb-idle" in dash.status.value, dash.status.value
    assert dash.summary["requests"] == 6
    running = dash.figure.data[1].y
    assert len(running) >= 2 and max(running) >= 1
    assert engine.policy.is_identity  # the controller's last policy is undone after the run
    dash.elastic.value = False
    dash.requests.value = 200
    dash.run()
    dash.stop.click()
    dash.wait()
    assert "stopped" in dash.status.value or "wb-idle" in dash.status.value


def test_precision_tuner_rounds_with_the_chosen_method(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    tiny = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    tuner = PrecisionTuner(tiny, prompt="weights in fewer bits", max_new_tokens=2)
    tuner.format.value = "int4-g32"
    tuner.wait()
    rtn_scale = tiny.model.get_submodule("model.layers.0.mlp.down_proj").store.scale.clone()
    tuner.method.value = "imatrix"
    tuner.wait()
    assert tiny.policy.default.weights == parse_precision("int4-g32-imatrix") and "wb-idle" in tuner.status.value
    assert not torch.equal(tiny.model.get_submodule("model.layers.0.mlp.down_proj").store.scale, rtn_scale)
    tuner.format.value = "fp8"  # no calibrated rounding for fp8: one line in the status, the model unchanged
    tuner.wait()
    assert "imatrix serves int4/int3/int2 groups, not fp8" in tuner.status.value
    assert tiny.policy.default.weights == parse_precision("int4-g32-imatrix")
