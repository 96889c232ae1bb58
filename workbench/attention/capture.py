"""Attention capture: `capture_attention` runs one prompt with the backend on every layer and returns, for a subset of layers
and heads, the dense attention probabilities, the keys the current selector keeps, and the recall.
"""
from __future__ import annotations

import numpy as np
import torch

from workbench.attention.install import set_layer_selectors
from workbench.errors import InputError
from workbench.policy import Attention
from workbench.roles import attention_modules


class AttentionCapture:
    """Collects dense probabilities and kept-key masks for chosen layers and heads (float16 / bool)."""

    def __init__(self, layers: list[int], heads: list[int] | None, length: int):
        self.layers, self.heads, self.length = layers, heads, length
        self.dense: dict[int, np.ndarray] = {}
        self.kept: dict[int, np.ndarray] = {}
        self.native: set[int] = set()
        self.overlap: dict[int, list[float]] = {}  # layer -> [sum of per-query overlap, queries]

    def record_ours(self, layer: int, start: int, ours: torch.Tensor, native, valid: torch.Tensor) -> None:
        """With a native selection (DeepSeek-V3.2): how much of it our selector also picks, per query."""
        if layer not in self.layers or native is None:
            return
        nat = native.expand_as(ours) & valid
        both = (ours & nat).sum(-1).float()
        share = both / nat.sum(-1).clamp(min=1).float()  # (B, H, c)
        acc = self.overlap.setdefault(layer, [0.0, 0])
        acc[0] += share.sum().item()
        acc[1] += share.numel()

    def record(self, layer: int, start: int, dense: torch.Tensor, keep: torch.Tensor, native: bool,
               valid: torch.Tensor) -> None:
        if layer not in self.layers:
            return
        heads = self.heads if self.heads is not None else list(range(dense.shape[1]))
        d = dense[0, heads].to(torch.float16).cpu().numpy()  # (h, c, Tk); batch of one prompt
        k = (keep & valid)[0, heads].cpu().numpy()
        if layer not in self.dense:
            self.dense[layer] = np.zeros((len(heads), self.length, self.length), np.float16)
            self.kept[layer] = np.zeros((len(heads), self.length, self.length), bool)
        self.dense[layer][:, start:start + d.shape[1], : d.shape[2]] = d
        self.kept[layer][:, start:start + k.shape[1], : k.shape[2]] = k
        if native:
            self.native.add(layer)


MAX_CAPTURE_ELEMENTS = 200_000_000  # about 600 MB of float16 + bool: beyond this, ask for fewer layers/heads


def capture_attention(engine, prompt: str | list, layers: list[int] | None = None, heads: list[int] | None = None,
                      max_tokens: int = 512, chat: bool | None = False) -> dict:
    """Dense attention, the current selection and its recall for one prompt, as plain arrays.

    Returns {"tokens": [str], "layers": [...], "heads": [...], "dense": {layer: (h, T, T) float16},
    "selected": {layer: (h, T, T) bool}, "recall": {layer: [per-head recall]}, "selector": {layer: name},
    "native": [layers whose selection includes the model's own DSA indexer], "native_overlap": {layer: share
    of the native indexer's keys that our selector also picks}}.
    """
    model = engine.model
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    if not layers or any(not 0 <= l < n_layers for l in layers):
        raise InputError(f"layers must be indices in [0, {n_layers}), got {layers}")
    n_heads = model.config.num_attention_heads
    if heads is not None and (not heads or any(not 0 <= h < n_heads for h in heads)):
        raise InputError(f"heads must be indices in [0, {n_heads}), got {heads}")
    ids = engine.encode([prompt] if isinstance(prompt, str) else prompt, chat=chat)["input_ids"][:1, :max_tokens]
    t = ids.shape[1]
    if len(layers) * (len(heads) if heads else n_heads) * t * t > MAX_CAPTURE_ELEMENTS:
        raise InputError(f"capturing {len(layers)} layers x {len(heads) if heads else n_heads} heads x {t}^2 tokens "
                         "is too large; pick fewer layers, heads or tokens")
    capture = AttentionCapture(layers, heads, t)
    selectors = dict(getattr(model, "workbench_selectors", {}) or {})
    modules = dict((m.layer_idx, m) for _, m in attention_modules(model))
    with engine.exclusive():
        model.workbench_capturing = True
        try:
            set_layer_selectors(model, {i: selectors.get(i, Attention()) for i in modules})
            for i in layers:
                modules[i].workbench_capture = capture
            engine.forward(ids)
        finally:
            for m in modules.values():
                if hasattr(m, "workbench_capture"):
                    del m.workbench_capture
            model.workbench_capturing = False
            set_layer_selectors(model, {i: selectors.get(i, Attention()) for i in modules} if selectors else {})
    tokens = [engine.tokenizer.decode([i]) for i in ids[0].tolist()]
    recall = {l: [float((capture.dense[l][h].astype(np.float32) * capture.kept[l][h]).sum(-1).mean())
                  for h in range(capture.dense[l].shape[0])] for l in capture.dense}
    names = {i: selectors.get(i, Attention()).selector for i in layers}
    overlap = {l: acc[0] / acc[1] for l, acc in capture.overlap.items() if acc[1]}
    return {"tokens": tokens, "layers": layers, "heads": heads or list(range(n_heads)), "dense": capture.dense,
            "selected": capture.kept, "recall": recall, "selector": names, "native": sorted(capture.native),
            "native_overlap": overlap}
