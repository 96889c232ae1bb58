"""Expert load of a mixture-of-experts model: how many tokens each routed expert received, per layer.

A forward hook on every router (the `gate` of a module with `experts`) adds its chosen expert indices into
a counter on the model's device (every token the router saw: padding and idle slots route too, and their
experts do the work) (`index_add_`, no host sync: a step that is captured counts on replay).
`Engine.stats()["expert_load"]` reads it; `Engine.reset_stats` zeroes it; `viz.expert_load_figure` draws it.
"""
from __future__ import annotations

import torch
from torch import nn


def routers(model: nn.Module) -> list[tuple[int, nn.Module, int]]:
    """(layer index, router module, routed experts) for every MoE layer, in order."""
    out = []
    for i, layer in enumerate(getattr(getattr(model, "model", None), "layers", [])):
        mlp = getattr(layer, "mlp", None)
        gate, experts = getattr(mlp, "gate", None), getattr(mlp, "experts", None)
        n = getattr(model.config, "n_routed_experts", None) or getattr(model.config, "num_experts", None)
        if gate is not None and experts is not None and n:
            out.append((i, gate, int(n)))
    return out


def install(model: nn.Module) -> None:
    """Count the tokens routed to each expert from now on (once per model; a no-op for dense models)."""
    if hasattr(model, "workbench_expert_load") or not routers(model):
        return
    found = routers(model)
    device = next(model.parameters()).device
    counts = torch.zeros(len(found), found[0][2], dtype=torch.long, device=device)
    tokens = torch.zeros(len(found), dtype=torch.long, device=device)
    model.workbench_expert_load = (counts, tokens, [i for i, _, _ in found])
    for row, (_, gate, _) in enumerate(found):
        gate.register_forward_hook(_counter(counts, tokens, row))


def _counter(counts: torch.Tensor, tokens: torch.Tensor, row: int):
    def hook(module, args, output):
        chosen = next(t for t in reversed(output) if isinstance(t, torch.Tensor) and not t.is_floating_point())
        flat = chosen.reshape(-1)
        counts[row].index_add_(0, flat, torch.ones_like(flat))
        tokens[row] += chosen.shape[0]
    return hook


def expert_load(model: nn.Module) -> dict | None:
    """{"layers": [index...], "tokens": routed tokens per layer, "counts": [[tokens per expert]...],
    "imbalance": max/mean expert load per layer (1.0: even)}; None for a dense model or before any token."""
    state = getattr(model, "workbench_expert_load", None)
    if state is None or not int(state[1].sum()):
        return None
    counts, tokens, layers = state
    c = counts.cpu()
    mean = c.float().mean(dim=1).clamp_min(1e-9)
    return {"layers": layers, "tokens": tokens.cpu().tolist(), "counts": c.tolist(),
            "imbalance": (c.float().max(dim=1).values / mean).tolist()}


def reset(model: nn.Module) -> None:
    state = getattr(model, "workbench_expert_load", None)
    if state is not None:
        state[0].zero_()
        state[1].zero_()
