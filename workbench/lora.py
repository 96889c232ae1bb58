"""LoRA on the engine's model, plain or under any policy, through peft.

    handle = attach_lora(engine, r=16, alpha=32, targets=("q", "v"), dropout=0.1)
    ...train...
    report = merge(engine)      # folds the adapters into the weights, format by format
    unload(engine)              # or drop them

A layer a policy has wrapped (sparse input, packed weights) gets our own LoRA layer, registered with
peft: peft's plain LoRA layer would add the update to `weight.data`, which for packed weights is not the
weight. Ours merges by dequantize, add, requantize (`WorkbenchLinear.merge_delta`) and reports what the
requantization cost. The adapter branch reads the layer's dense input; the base branch keeps the
policy's sparsity and format, so training sees the compressed model it is meant to repair.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from workbench.errors import InputError
from workbench.roles import linear_modules


def _lora_linear():
    from peft.tuners.lora.layer import Linear

    class WorkbenchLoraLinear(Linear):
        """peft's LoRA layer over a WorkbenchLinear: forward as peft's, merge through the layer's format."""

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            from peft.tuners.tuners_utils import check_adapters_to_merge
            for name in check_adapters_to_merge(self, adapter_names):
                if name in self.lora_A:
                    delta = self.get_delta_weight(name)
                    self.merge_reports[name] = self.get_base_layer().merge_delta(delta)
                    self.merged_adapters.append(name)

        def unmerge(self) -> None:
            while self.merged_adapters:  # exact for plain weights; within one requantization for packed ones
                name = self.merged_adapters.pop()
                self.get_base_layer().merge_delta(-self.get_delta_weight(name))

    return WorkbenchLoraLinear


@dataclass
class LoraHandle:
    """What `attach_lora` did: the targeted modules, the settings, and the trainable parameter count."""

    targets: list[str]
    r: int
    alpha: float
    dropout: float
    trainable: int
    merged: dict = field(default_factory=dict)


def _resolve_targets(model: nn.Module, targets) -> list[str]:
    wanted = None if targets == "all-linear" else set([targets] if isinstance(targets, str) else targets)
    if wanted is not None and not wanted:
        raise InputError("targets must name at least one role (q, k, v, o, gate, up, down, ...) or be 'all-linear'")
    names = [fqn for fqn, _, role in linear_modules(model)
             if role not in (None, "lm_head") and (wanted is None or role in wanted or fqn in wanted)]
    if not names:
        roles = sorted({r for _, _, r in linear_modules(model) if r})
        raise InputError(f"LoRA targets {sorted(wanted)} match no module; roles in this model: {', '.join(roles)}")
    return names


def attach_lora(engine, r: int = 16, alpha: float = 32, targets=("q", "v"), dropout: float = 0.0) -> LoraHandle:
    """Add LoRA adapters to the engine's model (plain layers and policy wrappers alike); only they train."""
    from peft import LoraConfig, inject_adapter_in_model

    from workbench.layers import WorkbenchLinear
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise InputError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not alpha > 0 or not 0 <= dropout < 1:
        raise InputError(f"LoRA needs alpha > 0 and dropout in [0, 1), got alpha={alpha}, dropout={dropout}")
    if getattr(engine.model, "workbench_lora", None) is not None:
        raise InputError("this engine already has LoRA adapters; merge or unload them first")
    model = engine.model
    names = _resolve_targets(model, targets)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    config._register_custom_module({WorkbenchLinear: _lora_linear()})
    with engine._lock:
        engine._decode_states.clear()  # captured decode graphs hold the modules being replaced
        for p in model.parameters():
            p.requires_grad_(False)
        with warnings.catch_warnings():  # peft warns about any custom layer type; ours is registered above
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            inject_adapter_in_model(config, model)
        for m in model.modules():
            if hasattr(m, "lora_A"):
                m.merge_reports = {}
    trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n and p.requires_grad)
    handle = LoraHandle(names, r, float(alpha), float(dropout), trainable)
    model.workbench_lora = handle
    return handle


def lora_layers(model: nn.Module):
    from peft.tuners.lora.layer import LoraLayer
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def merge(engine) -> dict:
    """Fold every adapter into its layer's weights (each format: dequantize, add, requantize) and remove
    the adapter layers. Returns the requantization error per packed layer (SQNR dB, max abs error)."""
    report = {}
    with engine._lock:
        engine._decode_states.clear()
        for name, layer in lora_layers(engine.model):
            layer.merge()
            for adapter, r in getattr(layer, "merge_reports", {}).items():
                if r and r.get("sqnr_db") not in (None, float("inf")):
                    report[name] = r
        _remove_adapters(engine.model)
        if engine.store_cache is not None:  # packed weights were rebuilt from new values
            engine.store_cache.clear()
    return report


def unload(engine) -> None:
    """Remove the adapters without merging: the model is as it was before `attach_lora`."""
    with engine._lock:
        engine._decode_states.clear()
        _remove_adapters(engine.model)


def _remove_adapters(model: nn.Module) -> None:
    for name, layer in lora_layers(model):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    if hasattr(model, "workbench_lora"):
        del model.workbench_lora
