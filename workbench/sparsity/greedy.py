"""TEAL's block-wise greedy allocation of activation sparsity.

For each decoder block, start dense and repeatedly raise by one step (5 points) the sparsity of the
projection group whose increase costs the least block-output error per unit of parameter-weighted
sparsity gained, until the block reaches 85% sparsity. The path of allocations is recorded, so any
model-wide target below that is read off it by interpolation, without recomputing.

Groups share an input (and so a mask): q/k/v (and DeepSeek's q_a/kv_a), o, gate/up, down, q_b, kv_b.
The error is measured on the block alone: the block's exact call arguments (hidden states, position
embeddings, mask) are captured once from a full forward pass and replayed, so this works for any
architecture without touching its modelling code.
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import nn

from workbench.corpus import load_text, token_windows
from workbench.progress import progress as bar
from workbench.roles import role_of
from workbench.sparsity.calibration import Calibration, calibration_targets, input_hooks
from workbench.sparsity.rules import threshold_sparsify

STEP = 0.05
MAX_LAYER_SPARSITY = 0.85
MAX_MODULE_SPARSITY = 0.95
GREEDY_TOKENS = 256
GROUP_OF_ROLE = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "q_a": "attn_in", "kv_a": "attn_in",
                 "q_b": "q_b", "kv_b": "kv_b", "o": "o", "gate": "mlp_in", "up": "mlp_in", "down": "down"}


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(fqn, m) for fqn, m in model.named_modules() if re.search(r"(^|\.)layers\.\d+$", fqn)]


def _capture_block_inputs(engine, ids: torch.Tensor) -> dict[str, tuple]:
    """Each decoder block's (args, kwargs) from one dense forward pass."""
    captured = {}
    handles = []
    for fqn, layer in decoder_layers(engine.model):
        def hook(mod, args, kwargs, fqn=fqn):
            captured[fqn] = (tuple(a.clone() if torch.is_tensor(a) else a for a in args), dict(kwargs))
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with engine.reference():
            engine.forward(ids)
    finally:
        for h in handles:
            h.remove()
    return captured


def _block_output(layer: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = layer(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def allocate_greedy(engine, calibration: Calibration, tokens: int = GREEDY_TOKENS, progress: bool = True) -> None:
    """Fill each module's greedy path in `calibration` (in place)."""
    text, _ = load_text(None, "calibration")
    ids = token_windows(engine.tokenizer, text, min(tokens + 1, engine.max_positions), tokens)[0][None]
    ids = ids.to(engine.device)
    captured = _capture_block_inputs(engine, ids)
    by_layer = defaultdict(list)
    for fqn, module in calibration_targets(engine.model):
        layer_fqn = re.match(r"(.*?layers\.\d+)\.", fqn).group(1)
        by_layer[layer_fqn].append((fqn, module))
    layers = dict(decoder_layers(engine.model))
    with torch.inference_mode(), engine.reference():
        for layer_fqn in bar(list(by_layer), desc="greedy allocation", unit="layer", enabled=progress):
            if layer_fqn not in captured:
                continue
            _allocate_layer(layers[layer_fqn], captured[layer_fqn], by_layer[layer_fqn], calibration)


def _allocate_layer(layer: nn.Module, call: tuple, targets: list, calibration: Calibration) -> None:
    groups: dict[str, list[str]] = defaultdict(list)
    params: dict[str, int] = defaultdict(int)
    for fqn, module in targets:
        g = GROUP_OF_ROLE.get(role_of(fqn), fqn)
        groups[g].append(fqn)
        params[g] += module.weight.numel()
    total = sum(params.values())
    dense = _block_output(layer, *call)
    thresholds: dict[str, float] = {fqn: 0.0 for fqn, _ in targets}

    def zero_small(fqn, module, x):
        t = thresholds[fqn]
        return (threshold_sparsify(x, t),) if t > 0 else None

    def error(alloc: dict[str, float]) -> float:
        for g, s in alloc.items():
            for fqn in groups[g]:
                thresholds[fqn] = calibration.modules[fqn].threshold(s)
        out = _block_output(layer, *call)
        return ((out - dense).float().pow(2).sum() / dense.float().pow(2).sum().clamp_min(1e-30)).item()

    alloc = {g: 0.0 for g in groups}
    path = [(0.0, dict(alloc))]
    with input_hooks(targets, zero_small):
        current = 0.0
        while sum(params[g] * s for g, s in alloc.items()) / total < MAX_LAYER_SPARSITY:
            options = []
            for g in alloc:
                if alloc[g] + STEP > MAX_MODULE_SPARSITY + 1e-9:
                    continue
                trial = dict(alloc, **{g: round(alloc[g] + STEP, 4)})
                gain = STEP * params[g] / total
                err = error(trial)
                options.append(((err - current) / gain, err, trial))
            if not options:
                break
            _, current, alloc = min(options, key=lambda o: o[0])
            path.append((sum(params[h] * s for h, s in alloc.items()) / total, dict(alloc)))
    for g, fqns in groups.items():
        for fqn in fqns:
            calibration.modules[fqn].greedy_path = [(round(ls, 6), a[g]) for ls, a in path]
