"""Quantization methods: how a weight format's values are chosen (registered in `QUANT_METHODS`).

    rtn      round to nearest, with the format's own scale search (no data)
    gptq     GPTQ under the Hessian of the layer's calibration inputs (`formats.gptq`, `formats.hessians`)
    imatrix  round to nearest with each group's scale searched under the inputs' mean squared
             activation per channel (llama.cpp's importance matrix; `formats.imatrix`)
    awq      round to nearest after scaling the input channels by activation, the inverse folded into
             the RMSNorm that feeds the layer (AWQ's idea; `formats.awq`)

A method produces the format's ordinary packed tensors, so kernels, byte accounting, LoRA merging and the
reference dequantization are the same for every method. The policy names it with the precision:
``int4-g64-gptq`` (CLI: ``--precision int4-g64 --quant-method gptq``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from workbench.errors import PolicyError
from workbench.formats.gptq import gptq_quantize, grouped_bits
from workbench.formats.imatrix import imatrix_quantize
from workbench.policy import QUANT_METHODS, WEIGHT_FORMATS, Weights


@dataclass(frozen=True)
class QuantMethod:
    name: str
    needs_hessian: bool
    doc: str
    row_int8: bool = False  # also serves int8 with one scale per row (besides the grouped formats)
    fn: Callable | None = None  # (w, hessian, spec, name) -> the format's tensors, for calibrated methods

    def validate(self, spec: Weights) -> None:
        if not self.needs_hessian:
            return
        if not (grouped_bits(spec.format) or (self.row_int8 and spec.format == "int8" and not spec.group_size)):
            served = "int4/int3/int2 groups" + (" and per-row int8" if self.row_int8 else "")
            raise PolicyError(f"{self.name} serves {served}, not {spec.format}"
                              + (f" with blocks of {spec.group_size}" if spec.group_size else ""))

    def quantize(self, w, spec: Weights, hessian=None, name: str = "a layer", scale=None):
        """The packed weight of `w` under `spec` (a `PackedWeight`); `awq` rounds w diag(`scale`) (its input
        channels scaled, the inverse folded into the norm before it: `formats.awq`), or w itself without one."""
        fmt = WEIGHT_FORMATS.get(spec.format)
        if self.name == "awq":
            return fmt.quantize(w if scale is None else w * scale.to(w.device, w.dtype), spec)
        if not self.needs_hessian:
            return fmt.quantize(w, spec)
        if hessian is None:
            raise PolicyError(f"{name}: {self.name} needs calibration inputs (a Hessian) and got none")
        from workbench.formats.packed import PackedWeight
        tensors = self.fn(w.detach().float().cpu(), hessian, spec, name=name)
        tensors = {k: v.to(w.device) for k, v in tensors.items()}
        return PackedWeight(fmt, spec, tuple(w.shape), tensors, w.dtype)


def needs_hessians(policy) -> bool:
    settings = [policy.default] + [r.setting for r in policy.rules]
    return any(QUANT_METHODS.get(s.weights.method).needs_hessian for s in settings)


def pending_calibrated(model, policy, store_cache: dict | None) -> list[str]:
    """The linear layers `policy` quantizes with a calibrated method whose packed weight is not in
    `store_cache` yet (what a Hessian must be collected for)."""
    from workbench.transforms import base_of, plan, store_key
    out = []
    for step in plan(model, policy):
        if step.role == "embed" or not QUANT_METHODS.get(step.setting.weights.method).needs_hessian:
            continue
        base = base_of(model.get_submodule(step.fqn))
        if (store_cache or {}).get(store_key(base, step.setting)) is None:
            out.append(step.fqn)
    return out


QUANT_METHODS.register("rtn", QuantMethod("rtn", False, "round to nearest (the format's scale search)"))
QUANT_METHODS.register("gptq", QuantMethod("gptq", True, "GPTQ: error feedback under the calibration Hessian",
                                           row_int8=True, fn=gptq_quantize))
QUANT_METHODS.register("awq", QuantMethod("awq", True, "activation-aware input scales, searched on the calibration "
                                                       "Hessian and folded into the feeding RMSNorm (AWQ)",
                                          row_int8=True))
QUANT_METHODS.register("imatrix", QuantMethod("imatrix", True, "group scales searched under the inputs' mean "
                                                               "squared activation (llama.cpp's imatrix)",
                                              fn=imatrix_quantize))
