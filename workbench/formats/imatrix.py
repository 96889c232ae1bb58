"""Importance-weighted rounding: llama.cpp's importance matrix (imatrix) idea in our grouped formats.

Each group's scale search (`quant.quantize_grouped`) weighs the round-trip error of input channel k by
that channel's mean squared activation on calibration text, E[x_k^2], so the channels whose inputs are
large, and whose weight errors therefore reach the layer's output the most, are rounded most carefully.
The statistic is the diagonal of the same calibration Hessian GPTQ uses (`formats.hessians`: sum of x x^T
over the calibration tokens), divided by the token count's scale (only its ratios matter here). Unlike
GPTQ it moves no error between columns: every code is still the nearest one under its group's scale, so
this is round-to-nearest with better scales, at RTN's speed once the statistic exists.

    tensors = imatrix_quantize(w, hessian, Weights("int3", 64))   # the format's own tensors
"""
from __future__ import annotations

import torch

from workbench.errors import PolicyError
from workbench.formats.gptq import grouped_bits
from workbench.formats.quant import quantize_grouped


def importance(hessian: torch.Tensor) -> torch.Tensor:
    """Per input channel, its share of the mean squared activation (diag of sum x x^T, mean 1)."""
    diag = torch.diagonal(hessian).float().clamp_min(0)
    return diag / diag.mean().clamp_min(1e-30)


def imatrix_quantize(w: torch.Tensor, hessian: torch.Tensor, spec, name: str = "a layer") -> dict[str, torch.Tensor]:
    """The format tensors of `w` (N, K): each group's scale chosen for the least importance-weighted
    squared error."""
    bits = grouped_bits(spec.format)
    if bits is None:
        raise PolicyError(f"{name}: imatrix serves int4/int3/int2 groups, not {spec.label}")
    k = w.shape[1]
    if hessian.shape != (k, k):
        raise PolicyError(f"{name}: Hessian is {tuple(hessian.shape)}, the layer takes {k} inputs")
    return quantize_grouped(w, bits, spec.group_size, spec.symmetric, importance=importance(hessian))
