"""WorkbenchLinear: a reversible wrapper around nn.Linear for input sparsity and weight formats.

The original layer is kept as `.base` (as peft keeps `base_layer`), so `unwrap` is exact and the
reference model is one flag away (`bypass`). The forward is the method's math and nothing else:

    y = matmul_format(sparsify(x), W) + b

`sparsify` comes from the sparsity rule's registry entry, the matmul from the weight format's. The
wrapper does not subclass nn.Linear: a packed weight is not a `.weight` that others may add to.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from workbench.policy import SPARSITY_RULES, WEIGHT_FORMATS, Setting


def check_setting(base: nn.Module, setting: Setting, fqn: str) -> None:
    """Raise a PolicyError naming `fqn` if `setting` cannot apply to this layer's shape."""
    if not setting.weights.is_identity:
        WEIGHT_FORMATS.get(setting.weights.format).check_shape(setting.weights, tuple(base.weight.shape), fqn)


class WorkbenchLinear(nn.Module):
    is_workbench_linear = True

    def __init__(self, base: nn.Linear, setting: Setting, fqn: str = "", role: str | None = None,
                 calibration: Any = None):
        super().__init__()
        self.base = base
        self.setting = setting
        self.fqn, self.role, self.calibration = fqn, role, calibration
        self.in_features, self.out_features = base.in_features, base.out_features
        self.bypass = False  # True: behave exactly as the original layer (the reference)
        self.dense_multi_token = False  # True while the engine prefills a prompt with dense prefill
        sp = setting.sparsity
        self.sparsifier = None if sp.is_identity else SPARSITY_RULES.get(sp.rule).build(sp, base.weight, calibration)
        w = setting.weights
        self.store = None if w.is_identity else WEIGHT_FORMATS.get(w.format).quantize(base.weight.detach(), w)
        self.track_stats = True
        self.register_buffer("zeros_seen", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("entries_seen", torch.zeros((), dtype=torch.float64), persistent=False)

    @classmethod
    def from_linear(cls, base: nn.Linear, setting: Setting, fqn: str = "", role: str | None = None,
                    calibration: Any = None) -> "WorkbenchLinear":
        return cls(base, setting, fqn, role, calibration)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return self.base(x)
        if self.sparsifier is not None and not (self.dense_multi_token and x.shape[-2] > 1):
            x = self.sparsifier(x)
            if self.track_stats:
                self.zeros_seen += (x == 0).sum()
                self.entries_seen += x.numel()
        y = self.base(x) if self.store is None else self.store.matmul(x)
        if self.store is not None and self.base.bias is not None:
            y = y + self.base.bias
        return y

    # ---- facts for stats() ---------------------------------------------------------------------------
    @property
    def achieved_sparsity(self) -> float | None:
        n = float(self.entries_seen)
        return float(self.zeros_seen) / n if n else None

    def reset_stats(self) -> None:
        self.zeros_seen.zero_()
        self.entries_seen.zero_()

    def compute_weight_bytes(self) -> int:
        """Bytes the compute path reads for this layer's weight (packed data and scales)."""
        if self.store is not None:
            return self.store.nbytes
        return self.base.weight.numel() * self.base.weight.element_size()

    def dequantized_weight(self) -> torch.Tensor:
        return self.base.weight if self.store is None else self.store.dequantize()

    def extra_repr(self) -> str:
        return f"{self.fqn or 'linear'}: in={self.in_features}, out={self.out_features}, setting={self.setting}"
