"""WorkbenchLinear: a reversible wrapper around nn.Linear for input sparsity and weight formats.

The original layer is kept as `.base` (as peft keeps `base_layer`), so `unwrap` is exact and the
reference model is one flag away (`bypass`). The forward is the method's math and nothing else:

    y = matmul_format(sparsify(x), W) + b

`sparsify` comes from the sparsity rule's registry entry, the matmul from the weight format's. The
wrapper does not subclass nn.Linear: a packed weight is not a `.weight` that others may add to.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workbench.formats.quant import sqnr_db
from workbench.policy import QUANT_METHODS, SPARSITY_RULES, WEIGHT_FORMATS, Setting


def check_setting(base: nn.Module, setting: Setting, fqn: str, embedding: bool = False) -> None:
    """Raise a PolicyError naming `fqn` if `setting` cannot apply to this layer's shape."""
    if not setting.weights.is_identity:
        WEIGHT_FORMATS.get(setting.weights.format).check_shape(setting.weights, tuple(base.weight.shape), fqn,
                                                               embedding)


class SharedInputCache:
    """One-entry memo of the last sparsified input, shared by a model's wrappers.

    q/k/v (and gate/up) receive the very same tensor; under equal cuts the first computes the sparse input
    (key `(cut, "masked")`) or the kernel's selection (`(cut, "selection")`) and the zero count, the
    others reuse them. The tensor's version counter guards against in-place edits between the calls.
    """

    def __init__(self):
        self.input = self.output = self.nonzero = self.key = None
        self.version = -1

    @staticmethod
    def _version_of(x: torch.Tensor) -> int:
        return 0 if x.is_inference() else x._version  # inference tensors keep no version counter

    def matches(self, x: torch.Tensor, key: tuple) -> bool:
        return x is self.input and key == self.key and self._version_of(x) == self.version

    def store(self, x: torch.Tensor, key: tuple, output: torch.Tensor, nonzero) -> None:
        self.input, self.version, self.key, self.output, self.nonzero = x, self._version_of(x), key, output, nonzero

    def clear(self) -> None:
        self.__init__()


class WorkbenchLinear(nn.Module):
    is_workbench_linear = True

    def __init__(self, base: nn.Linear, setting: Setting, fqn: str = "", role: str | None = None,
                 calibration: Any = None, store: nn.Module | None = None):
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
        if store is None and not w.is_identity:
            store = WEIGHT_FORMATS.get(w.format).quantize(base.weight.detach(), w)
        self.store = store  # shared with a tied embedding's wrapper when both use one format
        self.track_stats = True
        self.kernel = None  # on CUDA: the chosen Triton kernel, built on first use (False: none applies)
        self.token_probe: list | None = None  # set by probes.token_sparsity while it records
        self.input_cache: SharedInputCache | None = None  # set by apply_policy: one per model
        # counters are tensors so that a CUDA-graph replay of the decode step keeps counting
        where = base.weight.device if base.weight.device.type != "meta" else None
        # normal tensors even when built inside inference mode (the scheduler's loop): a wrapper outlives the
        # policy change that built it (`workbench.policy_builds`), and counts outside inference mode too
        with torch.inference_mode(False):
            for name in ("nonzero_seen", "entries_seen"):
                self.register_buffer(name, torch.zeros((), dtype=torch.int64, device=where), persistent=False)

    @classmethod
    def from_linear(cls, base: nn.Linear, setting: Setting, fqn: str = "", role: str | None = None,
                    calibration: Any = None, store: nn.Module | None = None) -> "WorkbenchLinear":
        return cls(base, setting, fqn, role, calibration, store)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return self.base(x)
        if x.is_cuda and self.kernel is not False:
            y = self._kernel_forward(x)
            if y is not None:
                return y if self.base.bias is None else y + self.base.bias
        return self.forward_and_input(x)[0]

    def forward_and_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference path's output and the input the weight multiplied (after the sparsity rule): a
        LoRA branch reads that input, so that folding the adapter into the weight changes nothing."""
        if self.sparsifier is not None and not (self.dense_multi_token and x.shape[-2] > 1):
            x = self._sparsify(x)
        if self.store is None:
            return F.linear(x, self.base.weight, self.base.bias), x
        y = self.store.matmul(x)
        return (y if self.base.bias is None else y + self.base.bias), x

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The layer's Triton kernel on CUDA (kernels/dispatch.py), or None for the reference path."""
        try:
            from workbench.kernels.dispatch import kernel_forward
        except ImportError:  # no Triton: the reference path serves
            self.kernel = False
            return None
        return kernel_forward(self, x)

    def _sparsify(self, x: torch.Tensor) -> torch.Tensor:
        cut = self.sparsifier.cut
        cache, key = self.input_cache, (None if cut is None else (cut, "masked"))
        if cache is not None and key is not None and cache.matches(x, key):
            xs, nonzero = cache.output, cache.nonzero
        else:
            xs = self.sparsifier.fn(x)
            nonzero = xs.bool().sum() if self.track_stats else None  # 10x faster than count_nonzero on CPU
            if cache is not None and key is not None:
                cache.store(x, key, xs, nonzero)
        if self.track_stats and nonzero is not None:
            self.nonzero_seen += nonzero  # one tensor op; no host sync on GPU
            self.entries_seen += x.numel()
        if self.token_probe is not None:  # per-token zero fraction, for the layer x token map
            self.token_probe.append((xs == 0).float().mean(-1).detach())
        return xs

    # ---- facts for stats() ---------------------------------------------------------------------------
    @property
    def achieved_sparsity(self) -> float | None:
        n = int(self.entries_seen)
        return 1.0 - int(self.nonzero_seen) / n if n else None

    def reset_stats(self) -> None:
        self.nonzero_seen.zero_()
        self.entries_seen.zero_()

    def compute_weight_bytes(self) -> int:
        """Bytes the compute path reads for this layer's weight (packed data and scales)."""
        if self.store is not None:
            return self.store.nbytes
        return self.base.weight.numel() * self.base.weight.element_size()

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the compute path multiplies by (float32 for quantized formats)."""
        return self.base.weight if self.store is None else self.store.dequantize()

    def merge_delta(self, delta: torch.Tensor) -> dict:
        """Fold an (N, K) update into the layer: dequantize, add, requantize (never touch packed bytes).

        Returns the requantization error against the exact sum, so a caller can report what merging
        into a low-bit format cost. Layers without a format keep the sum in a cast store of the base
        weight's dtype. `base` is never changed: the reference (bypass) stays the unmodified model.
        """
        exact = self.dequantized_weight().float() + delta.float()
        self.kernel = None  # its weight layout was built from the old weight
        if self.store is None:  # a cast store holds the merged weight; `base` stays the reference
            dtype = self.base.weight.dtype
            fmt = WEIGHT_FORMATS.get({torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype])
            spec = None
        else:
            fmt, spec = WEIGHT_FORMATS.get(self.setting.weights.format), self.setting.weights
            if QUANT_METHODS.get(spec.method).needs_hessian:  # no calibration inputs here: the merge rounds
                spec = dataclasses.replace(spec, method="rtn")  # to nearest, and says so in its report
        self.store = fmt.quantize(exact.to(self.base.weight.dtype), spec if spec is not None else self.setting.weights)
        approx = self.store.dequantize()
        return {"sqnr_db": sqnr_db(exact, approx), "max_abs_error": (exact - approx).abs().max().item(),
                "method": spec.method if spec is not None else "cast"}

    def extra_repr(self) -> str:
        return f"{self.fqn or 'linear'}: in={self.in_features}, out={self.out_features}, setting={self.setting}"


class WorkbenchEmbedding(nn.Module):
    """A quantized embedding table: looks up packed rows and dequantizes only those (keeps `.base`)."""

    is_workbench_embedding = True

    def __init__(self, base: nn.Embedding, setting: Setting, fqn: str = "", store: nn.Module | None = None):
        super().__init__()
        self.base, self.setting, self.fqn = base, setting, fqn
        self.bypass = False
        self.store = store or WEIGHT_FORMATS.get(setting.weights.format).quantize(base.weight.detach(), setting.weights)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return self.base(ids)
        rows = self.store.dequantize_rows(ids.reshape(-1))  # (n, D) float32
        out = rows.to(self.base.weight.dtype).reshape(*ids.shape, -1)
        scale = getattr(self.base, "embed_scale", None)  # Gemma's scaled embedding multiplies by sqrt(D)
        return out if scale is None else out * scale.to(out.dtype)

    def compute_weight_bytes(self) -> int:
        return self.store.nbytes
