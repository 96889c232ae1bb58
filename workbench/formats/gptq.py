"""GPTQ: round a weight one input column at a time and push each column's rounding error onto the
columns not yet rounded, weighted by the inverse Hessian of the layer's calibration inputs (Frantar et
al., 2022), so the layer's *output* error on those inputs is what is minimised, not the weight error.

    tensors = gptq_quantize(w, hessian, Weights("int4", 64))   # the int4 format's own tensors

The result is the format's ordinary packed tensors (`formats.quant`): every kernel, the byte accounting
and the exact reference dequantization apply unchanged. Choices, as the reference implementation and
AutoGPTQ make them:

* damping: 1% of the mean Hessian diagonal added to the diagonal (`damp`), more if Cholesky fails;
* column order by descending Hessian diagonal (`act_order`: the columns that see the largest inputs are
  rounded first, while many columns remain to absorb their error);
* lazy batch updates: blocks of 128 columns, the rest of the matrix updated once per block;
* group scales fixed before the sweep from the original weights with the format's own scale search
  ("static groups"), so groups stay contiguous along K as the format stores them, also under act_order;
* input channels the calibration never saw active (zero diagonal) are set to zero weight.

Formats: int4/int3/int2 groups (symmetric or asymmetric) and int8 with one scale per row.
"""
from __future__ import annotations

import torch

from workbench.errors import PolicyError
from workbench.formats.quant import pack_bits, quantize_grouped, quantize_int8_channel
from workbench.policy import WEIGHT_FORMATS


def grouped_bits(fmt: str) -> int | None:
    """Bits per code of a grouped low-bit format (int4/int3/int2, the registry's `bits`), else None."""
    return getattr(WEIGHT_FORMATS.get(fmt), "bits", None)

BLOCK = 128


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, spec, damp: float = 0.01, act_order: bool = True,
                  static_groups: bool = True, name: str = "a layer") -> dict[str, torch.Tensor]:
    """The format tensors of `w` (N, K) quantized by GPTQ under `hessian` (K, K) = sum of x x^T.

    `static_groups=False` (grouped formats only, and only without act order, where groups are swept in
    their stored order): each group's scale is searched on the group's weights as the sweep reaches it,
    after the error of the columns before it was pushed onto them (GPTQ's original scheme)."""
    bits = grouped_bits(spec.format)
    if not static_groups and (act_order or bits is None):
        raise ValueError("scales found during the sweep need grouped formats in stored order (act_order=False)")
    n, k = w.shape
    if hessian.shape != (k, k):
        raise PolicyError(f"{name}: Hessian is {tuple(hessian.shape)}, the layer takes {k} inputs")
    if bits is not None:
        fixed = quantize_grouped(w, bits, spec.group_size, spec.symmetric)
        scale = fixed["scale"].float().repeat_interleave(spec.group_size, dim=1)  # (N, K) per column
        low = fixed["min"].float().repeat_interleave(spec.group_size, dim=1) if "min" in fixed else None
        half = 1 << (bits - 1)
        lo_code, hi_code, offset = (0, 2 * half - 1, 0) if low is not None else (-half, half - 1, half)
    elif spec.format == "int8" and not spec.group_size:
        fixed = quantize_int8_channel(w)
        scale = fixed["scale"].float()[:, None].expand(n, k)
        low, lo_code, hi_code, offset = None, -127, 127, 0
    else:
        raise PolicyError(f"{name}: gptq serves int4/int3/int2 groups and per-row int8, not {spec.label}")

    W = w.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W, H = W[:, order], H[order][:, order]
    scale, low = scale[:, order], (low[:, order] if low is not None else None)
    hinv = _inverse_cholesky(H, damp, name)

    codes = torch.empty(n, k, dtype=torch.int32)
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        w1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if not static_groups and j % spec.group_size == 0:  # this group's scale, from its current weights
                ahead = torch.cat([w1[:, i:], W[:, i2:]], dim=1)[:, :spec.group_size]
                found = quantize_grouped(ahead, bits, spec.group_size, spec.symmetric)
                fixed["scale"][:, j // spec.group_size] = found["scale"][:, 0]
                scale[:, j:j + spec.group_size] = found["scale"].float()
                if low is not None:
                    fixed["min"][:, j // spec.group_size] = found["min"][:, 0]
                    low[:, j:j + spec.group_size] = found["min"].float()
            col, s = w1[:, i], scale[:, i1 + i]
            if low is None:
                c = torch.round(col / s).clamp(lo_code, hi_code)
                q = c * s
            else:
                m = low[:, i1 + i]
                c = torch.round((col - m) / s).clamp(lo_code, hi_code)
                q = c * s + m
            codes[:, i1 + i] = c.to(torch.int32)
            e = (col - q) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    codes = codes[:, torch.argsort(order)]  # back to the stored column order
    if spec.format == "int8":
        return {"q": codes.to(torch.int8), "scale": fixed["scale"]}
    out = {"q": pack_bits((codes + offset).to(torch.uint8), bits), "scale": fixed["scale"]}
    if "min" in fixed:
        out["min"] = fixed["min"]
    return out


def _inverse_cholesky(H: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (the GPTQ sweep's row-wise update weights), damping H as needed."""
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(H.shape[0])
    for attempt in range(6):  # 1%, 10%, ... of the mean diagonal: enough for any positive semi-definite H
        try:
            L = torch.linalg.cholesky(H + (damp * 10 ** attempt) * mean_diag * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise PolicyError(f"{name}: the calibration Hessian is singular even with damping; use more calibration text")
