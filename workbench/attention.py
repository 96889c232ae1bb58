"""Per-layer attention selection through transformers' AttentionInterface.

Each attention module gets a selector from the policy. When every layer is dense the model keeps its
own implementation (sdpa or eager) untouched; otherwise the workbench backend is registered under its
own name, together with a mask function (without one transformers hands the backend no causal mask and
prefill would see the future), and dispatches per layer on `module.layer_idx`.
"""
from __future__ import annotations

import contextlib

from torch import nn

from workbench.policy import Attention


def set_layer_selectors(model: nn.Module, selectors: dict[int, Attention]) -> None:
    """Install `selectors` (layer index -> Attention); all-dense restores the model's own attention."""
    if all(a.is_identity for a in selectors.values()):
        _restore_original(model)
        model.workbench_selectors = {}
        return
    from workbench.sparse_attention import install_backend
    if not hasattr(model, "workbench_original_attn"):
        model.workbench_original_attn = model.config._attn_implementation
    model.workbench_selectors = dict(selectors)
    install_backend(model)


def _restore_original(model: nn.Module) -> None:
    original = getattr(model, "workbench_original_attn", None)
    if original is not None:
        model.set_attn_implementation(original)
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
