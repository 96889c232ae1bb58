"""The calibration procedure: run the calibration text through the unmodified model and fill the artifact
(`workbench.sparsity.calibration`): histograms of every block linear's input, TEAL's and WINA's scores,
and optionally the greedy allocation. Cached per model fingerprint, so it runs once per model.
"""
from __future__ import annotations

import logging
import platform

import torch

from workbench.corpus import load_text, token_windows
from workbench.models import cache_dir
from workbench.progress import progress as bar
from workbench.sparsity.calibration import (BINS, DEFAULT_CALIBRATION_TOKENS, Calibration, ModuleCalibration,
                                            calibration_targets, histogram, input_hooks, model_fingerprint)
from workbench.sparsity.greedy import allocate_greedy
from workbench.sparsity.rules import column_norms

log = logging.getLogger(__name__)


def calibrate(engine, tokens: int = DEFAULT_CALIBRATION_TOKENS, seq_len: int = 512, corpus: str | None = None,
              greedy: bool = False, progress: bool = True) -> Calibration:
    """Histograms of every block linear's input over `tokens` calibration tokens (dense model).

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

    with input_hooks(targets, record), engine.reference():
        for window in bar(windows, desc="calibrating", unit="window", enabled=progress):
            engine.forward(window[None])
    modules = {fqn: ModuleCalibration(fqn, hists[fqn], weighted[fqn]) for fqn, _ in targets}
    meta = {"model": engine.name, "corpus": description, "tokens": sum(len(w) for w in windows),
            "python": platform.python_version()}
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


