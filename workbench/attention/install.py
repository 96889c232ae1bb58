"""Per-layer attention selection through transformers' AttentionInterface.

Each attention module gets a selector from the policy. When every layer is dense the model keeps its
own implementation (sdpa or eager) untouched; otherwise the workbench backend (`attention.backend`) is
registered under its own name with its mask function and dispatches per module.
"""
from __future__ import annotations

import contextlib

from torch import nn

from workbench.attention.backend import install_backend, uninstall
from workbench.policy import Attention


def set_layer_selectors(model: nn.Module, selectors: dict[int, Attention]) -> None:
    """Install `selectors` (layer index -> Attention); all-dense restores the model's own attention."""
    if all(a.is_identity for a in selectors.values()) and not getattr(model, "workbench_capturing", False):
        _restore_original(model)
        model.workbench_selectors = {}
        return
    if not hasattr(model, "workbench_original_attn"):
        model.workbench_original_attn = model.config._attn_implementation
    model.workbench_selectors = dict(selectors)
    install_backend(model)


def _restore_original(model: nn.Module) -> None:
    original = getattr(model, "workbench_original_attn", None)
    if original is not None:
        model.set_attn_implementation(original)
        uninstall(model)
        del model.workbench_original_attn


@contextlib.contextmanager
def dense_attention(model: nn.Module):
    """Every layer dense for the duration (the reference), then the selectors come back."""
    saved = getattr(model, "workbench_selectors", {})
    if not saved:
        yield
        return
    set_layer_selectors(model, {i: Attention() for i in saved})
    try:
        yield
    finally:
        set_layer_selectors(model, saved)
