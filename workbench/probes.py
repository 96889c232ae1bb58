"""One forward pass on a prompt, measured: quality against the reference and sparsity per layer and token.

What the live panels show after every change; plain numbers and lists out (the viz builders draw them).
"""
from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass

import torch

from workbench.evaluate import compare_logits
from workbench.transforms import wrappers


@dataclass
class PromptProbe:
    """The measured facts of one forward pass over a prompt under the current policy."""

    tokens: list[str]
    kld_mean: float
    top1: float
    forward_ms: float
    layers: list[int]
    token_sparsity: list[list[float]]  # [layer][token]: zero share of the layer's sparsified inputs


@contextlib.contextmanager
def _recording(model):
    rows = [(fqn, w) for fqn, w in wrappers(model) if w.sparsifier is not None]
    for _, w in rows:
        w.token_probe = []
    try:
        yield rows
    finally:
        for _, w in rows:
            w.token_probe = None


class PromptProber:
    """Holds a prompt's token ids and its reference logits (computed once), then probes any policy."""

    def __init__(self, engine, prompt: str, max_tokens: int = 128, chat: bool | None = None):
        self.engine = engine
        ids = engine.encode([prompt], chat)["input_ids"][:, :max_tokens]
        self.ids = ids
        self.tokens = [engine.tokenizer.decode([i]) for i in ids[0].tolist()]
        self.text = engine.tokenizer.decode(ids[0])  # the measured prompt as text (template included, truncated)
        self.reference = engine.reference_logits(ids)

    def probe(self) -> PromptProbe:
        engine = self.engine
        n_layers = engine.model.config.num_hidden_layers
        with _recording(engine.model) as rows:
            t0 = time.perf_counter()
            logits = engine.forward(self.ids)
            ms = (time.perf_counter() - t0) * 1e3
            sums = torch.zeros(n_layers, self.ids.shape[1])
            weights = torch.zeros(n_layers, 1)
            for fqn, w in rows:
                layer = re.search(r"layers\.(\d+)\.", fqn)
                if layer is None or not w.token_probe:
                    continue
                i = int(layer.group(1))
                sums[i] += w.token_probe[-1].reshape(-1)[: self.ids.shape[1]].float().cpu() * w.in_features
                weights[i] += w.in_features
        q = compare_logits(self.reference[0, :-1], logits[0, :-1], self.ids[0, 1:])
        matrix = torch.where(weights > 0, sums / weights.clamp_min(1), torch.zeros_like(sums))
        return PromptProbe(self.tokens, float(q["kld"].mean()), float(q["same_top1"].mean()), ms,
                           list(range(n_layers)), matrix.tolist())
