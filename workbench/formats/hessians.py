"""Second moments of each linear layer's calibration inputs, H = sum_t x_t x_t^T: what GPTQ minimises
the output error under.

    hessians = collect_hessians(engine, ["model.layers.0.mlp.down_proj", ...])
    h, tokens = hessians["model.layers.0.mlp.down_proj"]

The calibration split of the corpus runs once through the unmodified model (as the activation
histograms do, `sparsity.calibrate`). Layers that read the same tensor (q/k/v, gate/up) share one matrix.
Hessians are not cached on disk: at an 8B model's width they are tens of gigabytes; what GPTQ makes from
them (the packed weights) is (`formats.calibrated`).
"""
from __future__ import annotations

import torch

from workbench.corpus import load_text, token_windows
from workbench.errors import PolicyError
from workbench.progress import progress as bar
from workbench.roles import linear_modules
from workbench.sparsity.calibration import input_hooks

DEFAULT_TOKENS = 8192
# Fewer tokens per input and H overfits the calibration text: on the default model's layer-6 down_proj
# (1536 inputs) GPTQ's held-out output error was 1.07x RTN's from 2048 tokens, 0.61x from 8192.
MIN_TOKENS_PER_INPUT = 4


def collect_hessians(engine, fqns, tokens: int = DEFAULT_TOKENS, seq_len: int = 512, corpus: str | None = None,
                     progress: bool = True) -> dict[str, tuple[torch.Tensor, int]]:
    """{fqn: (H float32 (K, K) on the CPU, tokens seen)} for the named linear layers; at least
    `MIN_TOKENS_PER_INPUT` tokens per input of each, or a PolicyError naming the layer."""
    wanted = set(fqns)
    targets = [(fqn, m.base if getattr(m, "is_workbench_linear", False) else m)
               for fqn, m, _ in linear_modules(engine.model) if fqn in wanted]
    if len(targets) != len(wanted):
        missing = sorted(wanted - {fqn for fqn, _ in targets})
        raise PolicyError(f"no linear layer named {missing[0]!r} to calibrate")
    text, _ = load_text(corpus, "calibration")
    windows = token_windows(engine.tokenizer, text, min(seq_len, engine.max_positions), tokens)
    sums: dict[int, torch.Tensor] = {}  # id of the input's first reader -> running sum of x x^T
    owner: dict[str, int] = {}
    counts: dict[int, int] = {}
    last: dict = {"x": None, "key": None}

    def record(fqn, module, x):
        if x is last["x"]:  # the same tensor as the previous layer's input: q/k/v, gate/up
            owner[fqn] = last["key"]
            return
        key = id(module)
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        if key not in sums:
            sums[key] = torch.zeros(rows.shape[1], rows.shape[1], device=rows.device)
            counts[key] = 0
        sums[key].addmm_(rows.T, rows)  # in place: no (K, K) temporary per window
        counts[key] += rows.shape[0]
        owner[fqn] = key
        last["x"], last["key"] = x, key

    with input_hooks(targets, record), engine.reference():
        for window in bar(windows, desc="collecting Hessians", unit="window", enabled=progress):
            last["x"] = None
            engine.forward(window[None])
    out = {}
    for fqn, module in targets:
        key = owner.get(fqn)
        if key is None:
            raise PolicyError(f"{fqn} saw no calibration input")
        k = module.in_features
        if counts[key] < MIN_TOKENS_PER_INPUT * k:
            raise PolicyError(f"{fqn}: {counts[key]} calibration tokens for {k} inputs; GPTQ needs at least "
                              f"{MIN_TOKENS_PER_INPUT * k} (use more calibration text)")
        out[fqn] = (sums[key].cpu(), counts[key])
    return out
