"""apply_policy / unwrap: the one place that swaps modules.

`apply_policy(model, policy)` walks the model once. Every linear layer whose setting is not the
identity is replaced by a `WorkbenchLinear` that keeps the original as `.base`; attention layers whose
selector is not dense get a workbench attention backend (registered through transformers'
AttentionInterface, never by patching `forward`). Re-applying another policy rewraps only what changed and
reuses the kept originals, so switching policies live needs no weight reload. `unwrap(model)` restores the
exact original modules.

The plan is validated for the whole model before any module is touched, so a bad policy (say, a group
size that does not divide a layer's width) leaves the model as it was.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator

from torch import nn

from workbench.policy import Policy, Setting
from workbench.roles import attention_modules, linear_modules

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedModule:
    fqn: str
    role: str | None
    setting: Setting


def plan(model: nn.Module, policy: Policy) -> list[PlannedModule]:
    """Each linear layer's setting under `policy`; raises (model untouched) if any is invalid for its shape."""
    from workbench.layers import check_setting
    planned = []
    for fqn, module, role in linear_modules(model):
        setting = policy.setting_for(fqn, role)
        if not setting.linear_is_identity:
            check_setting(_base(module), setting, fqn)
        planned.append(PlannedModule(fqn, role, setting))
    return planned


def apply_policy(model: nn.Module, policy: Policy, calibration: Any = None) -> nn.Module:
    """Apply `policy` in place and return the model.

    >>> from workbench.models import load
    >>> model = load("synthetic:tiny-llama").model
    >>> _ = apply_policy(model, Policy.identity())
    """
    from workbench.layers import WorkbenchLinear
    steps = plan(model, policy)
    for step in steps:
        module = model.get_submodule(step.fqn)
        base = _base(module)
        if step.setting.linear_is_identity:
            replacement = base
        elif getattr(module, "is_workbench_linear", False) and module.setting == step.setting \
                and module.calibration is _calibration_for(calibration, step.fqn):
            replacement = module
        else:
            replacement = WorkbenchLinear.from_linear(base, step.setting, step.fqn, step.role,
                                                      _calibration_for(calibration, step.fqn))
        if replacement is not module:
            model.set_submodule(step.fqn, replacement)
    _apply_attention(model, policy)
    model.workbench_policy = policy
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Restore every original module and attention implementation (exact: the originals were kept)."""
    for fqn, module, _ in list(linear_modules(model)):
        if getattr(module, "is_workbench_linear", False):
            model.set_submodule(fqn, module.base)
    _apply_attention(model, Policy.identity())
    if hasattr(model, "workbench_policy"):
        del model.workbench_policy
    return model


def wrappers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for fqn, module, _ in linear_modules(model):
        if getattr(module, "is_workbench_linear", False):
            yield fqn, module


@contextlib.contextmanager
def bypassed(model: nn.Module):
    """Run the unmodified model for the duration: wrappers call their `.base`, attention goes dense.

    The reference for every quality number; needs the originals kept (`keep_reference=True`).
    """
    from workbench.attention import dense_attention
    active = [m for _, m in wrappers(model)]
    for m in active:
        m.bypass = True
    try:
        with dense_attention(model):
            yield model
    finally:
        for m in active:
            m.bypass = False


def _base(module: nn.Module) -> nn.Module:
    return module.base if getattr(module, "is_workbench_linear", False) else module


def _calibration_for(calibration: Any, fqn: str) -> Any:
    if calibration is None:
        return None
    return calibration.for_module(fqn)


def _apply_attention(model: nn.Module, policy: Policy) -> None:
    from workbench.attention import set_layer_selectors
    selectors = {}
    for fqn, module in attention_modules(model):
        setting = policy.setting_for(fqn, "attention")
        selectors[module.layer_idx] = setting.attention
    set_layer_selectors(model, selectors)
