"""The calibration procedure: run the calibration text through the unmodified model and fill the artifact
(`workbench.sparsity.calibration`): histograms of every block linear's input, TEAL's and WINA's scores,
and optionally the greedy allocation. Cached per model fingerprint, so it runs once per model.

`calibrate_under(engine, policy)` calibrates the model as it will run: thresholds from dense activations
are applied in a model that is already sparse (and quantized) upstream, so every layer's input drifts
and the achieved sparsity with it (default model, threshold rule: 0.4043 at a 0.40 target on held-out
text). Each round measures every layer's input under the policy with the previous round's thresholds and
recomputes them; a layer's input depends only on the layers before it, so the thresholds settle from the
first layer on (`experiments/activation_sparsity/drift.py` measures the rounds).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import platform

import torch

from workbench.corpus import load_text, token_windows
from workbench.errors import PolicyError
from workbench.models import cache_dir
from workbench.progress import progress as bar
from workbench.sparsity.calibration import (BINS, DEFAULT_CALIBRATION_TOKENS, Calibration, ModuleCalibration,
                                            calibration_targets, histogram, input_hooks, model_fingerprint,
                                            needs_calibration)
from workbench.sparsity.greedy import allocate_greedy
from workbench.sparsity.rules import column_norms

log = logging.getLogger(__name__)


def calibrate(engine, tokens: int = DEFAULT_CALIBRATION_TOKENS, seq_len: int = 512, corpus: str | None = None,
              greedy: bool = False, progress: bool = True, under=None) -> Calibration:
    """Histograms of every block linear's input over `tokens` calibration tokens (dense model; with
    `under`, a policy already applied to the engine: the inputs each layer gets under it, before its own
    sparsification).

    >>> from workbench import Engine
    >>> cal = calibrate(Engine.from_pretrained("synthetic:tiny-llama"), tokens=256, progress=False)
    >>> 0 < cal.for_module("model.layers.0.mlp.down_proj").threshold(0.5)
    True
    """
    text, description = load_text(corpus, "calibration")
    windows = token_windows(engine.tokenizer, text, min(seq_len, engine.max_positions), tokens)
    targets = calibration_targets(engine.model)
    norms = {fqn: column_norms(m.weight) for fqn, m in targets}
    hists = {fqn: torch.zeros(BINS, dtype=torch.float64) for fqn, _ in targets}
    weighted = {fqn: torch.zeros(BINS, dtype=torch.float64) for fqn, _ in targets}

    def record(fqn, module, x):
        a = x.detach().abs().reshape(-1, x.shape[-1])  # (tokens, D)
        hists[fqn] += histogram(a)
        weighted[fqn] += histogram(a.float() * norms[fqn].to(a.device))

    # under a policy the hooks sit on the wrappers: they see a layer's input before its own rule cuts it
    hooked = targets if under is None else [(fqn, engine.model.get_submodule(fqn)) for fqn, _ in targets]
    with input_hooks(hooked, record), (engine.reference() if under is None else contextlib.nullcontext()):
        for window in bar(windows, desc="calibrating" if under is None else f"calibrating under {under.name}",
                          unit="window", enabled=progress):
            engine.forward(window[None])
    modules = {fqn: ModuleCalibration(fqn, hists[fqn], weighted[fqn]) for fqn, _ in targets}
    meta = {"model": engine.name, "corpus": description, "tokens": sum(len(w) for w in windows),
            "python": platform.python_version()}
    if under is not None:
        meta["under"] = under.name
    cal = Calibration(model_fingerprint(engine.model), modules, meta)
    if greedy:
        allocate_greedy(engine, cal, progress=progress)
    return cal


def cached_calibration(engine, greedy: bool = False, progress: bool = True) -> Calibration:
    """The engine's model calibration from the cache, computed once and saved if absent."""
    path = cache_dir() / "calibration" / f"{model_fingerprint(engine.model)}.safetensors"
    if path.is_file():
        cal = Calibration.load(path)
        if not greedy or cal.has_greedy:
            return cal
        allocate_greedy(engine, cal, progress=progress)
        cal.save(path)
        return cal
    cal = calibrate(engine, greedy=greedy, progress=progress)
    cal.save(path)
    log.info("calibration cached at %s", path)
    return cal


def calibrate_under(engine, policy, rounds: int = 2, tokens: int = DEFAULT_CALIBRATION_TOKENS, seq_len: int = 512,
                    corpus: str | None = None, progress: bool = True) -> Calibration:
    """The artifact whose thresholds hold their targets in the model as `policy` runs it (see above):
    `rounds` passes under the policy, starting from the policy's artifact, else the engine's current
    calibration, else the cached dense one. The engine's policy and calibration are restored afterwards."""
    if rounds < 1:
        raise PolicyError(f"calibrating under a policy takes at least one round, got {rounds}")
    if not needs_calibration(policy)[0]:
        raise PolicyError(f"policy {policy.name!r} has no calibrated sparsity rule (threshold or weighted) "
                          "to calibrate under")
    saved, saved_cal = engine.policy, engine.calibration
    if policy.calibration is not None:
        cal = Calibration.load(policy.calibration)
    else:
        cal = engine.calibration or cached_calibration(engine, progress=progress)
    bare = dataclasses.replace(policy, calibration=None)
    try:
        for done in range(1, rounds + 1):
            engine.reconfigure(bare, calibration=cal)
            cal = calibrate(engine, tokens, seq_len, corpus, progress=progress, under=policy)
            cal.meta["rounds"] = str(done)
    finally:
        engine.calibration = saved_cal
        engine.reconfigure(saved)
    return cal
