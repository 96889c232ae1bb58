"""Weight formats as registry entries, and `PackedWeight`, the storage a quantized layer holds.

A format knows how to validate its parameters, check a layer's shape, quantize, dequantize and compute
its byte arithmetic. The matmul goes through `MATMUL_BACKENDS` keyed by (format, device type): the
reference (dequantize, then matmul) serves everywhere; a fast path registers itself where one exists,
and must equal the reference. On CUDA the decode-time kernels are chosen per layer instead
(`kernels/dispatch.py`), because the best kernel depends on the layer's sparsity as well as its format.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import PolicyError
from workbench.formats import quant
from workbench.policy import WEIGHT_FORMATS, Weights

INT4_GROUPS = (32, 64, 128, 256)  # the group sizes of every grouped low-bit format (int4, int3, int2)


@dataclass(frozen=True)
class WeightFormat:
    """One registered weight format. Its protocol: `validate` a spec, `check_shape` of a layer (and
    `fallback` when a model-wide spec does not fit), `quantize` into a `PackedWeight`, its byte
    arithmetic, the `labels` a person can pick, and `kernel_family`, which tells `kernels.dispatch`
    which GPU kernel family serves it (None: the reference path)."""

    name: str
    quantize_fn: Callable | None = None  # (w, spec) -> dict of tensors
    dequantize_fn: Callable | None = None  # (tensors, spec) -> float32 (N, K)
    doc: str = ""
    kernel_family: str | None = None  # "dense" (a cast the model's dtype can use), "int8", "int4", or None
    bits: int | None = None  # a grouped format (int8g, int4, int3, int2): bits per value; None otherwise
    spelling: str | None = None  # how labels spell it when the registry name differs (int8g: int8-gN)

    @property
    def display(self) -> str:
        return self.spelling or self.name

    def labels(self) -> list[str]:
        """Every spelling of this format a menu offers (``int4-g32`` ... ``int4-g256-asym``)."""
        if self.bits:
            return [f"{self.display}-g{g}" for g in INT4_GROUPS] + [f"{self.display}-g{g}-asym" for g in INT4_GROUPS]
        if self.name == "int8":
            return ["int8", "int8-block64", "int8-block128"]
        return [self.name]

    # -- parameters ------------------------------------------------------------------------------------
    def validate(self, spec: Weights) -> None:
        if self.name in ("none", "fp32", "bf16", "fp16", "fp8") and spec.group_size is not None:
            raise PolicyError(f"weight format {self.name!r} takes no group size, got {spec.group_size}")
        if self.bits:
            if spec.group_size is None:
                raise PolicyError(f"weight format {self.display!r} needs a group size: "
                                  + ", ".join(f"{self.display}-g{g}" for g in INT4_GROUPS[:-1])
                                  + f" or {self.display}-g{INT4_GROUPS[-1]}")
            if spec.group_size not in INT4_GROUPS:
                raise PolicyError(f"{self.display} group size must be one of {', '.join(map(str, INT4_GROUPS))}, "
                                  f"got {spec.group_size}")
        if not spec.symmetric and not self.bits:
            raise PolicyError(f"weight format {self.name!r} is symmetric only; asymmetric is an option of the "
                              "grouped int4, int3 and int2")

    def label(self, spec: Weights) -> str:
        if self.name == "int8" and spec.group_size:
            return f"int8-block{spec.group_size}"
        if self.bits:
            return f"{self.display}-g{spec.group_size}" + ("" if spec.symmetric else "-asym")
        return self.name

    def check_shape(self, spec: Weights, shape: tuple[int, int], fqn: str, embedding: bool = False) -> None:
        n, k = shape
        if embedding and self.name == "int8" and spec.group_size:
            raise PolicyError(f"{self.label(spec)} cannot apply to {fqn}: an embedding needs a row-wise format "
                              "(int8, int4-gN, fp8 or a cast)")
        g = spec.group_size
        if self.bits and k % g:
            raise PolicyError(f"{self.label(spec)} cannot apply to {fqn}: its {k} input features are not a "
                              f"multiple of the group size {g}")
        if self.name == "int8" and g and (n % g or k % g):
            raise PolicyError(f"{self.label(spec)} cannot apply to {fqn}: its shape {n}x{k} is not a multiple "
                              f"of the {g}x{g} block")

    def fallback(self, spec: Weights, shape: tuple[int, int], embedding: bool = False) -> Weights | None:
        """The nearest spec a layer of `shape` can take when a model-wide `spec` does not fit it (as
        llama.cpp falls back per tensor): the same bits with the largest group that divides the input
        features, else int8 per channel; int8 blocks that do not tile, int8 per channel. None: nothing fits."""
        n, k = shape
        if self.bits:
            group = next((g for g in sorted(INT4_GROUPS, reverse=True) if g < spec.group_size and k % g == 0), None)
            if group is not None:
                return Weights(self.name, group, spec.symmetric)
            return Weights("int8")
        if self.name == "int8" and spec.group_size:
            return Weights("int8")
        return None

    # -- storage ---------------------------------------------------------------------------------------
    def expected_bytes(self, spec: Weights, shape: tuple[int, int]) -> int:
        """The format's arithmetic: what `PackedWeight.nbytes` must equal."""
        n, k = shape
        if self.name in ("fp32", "bf16", "fp16"):
            return n * k * {"fp32": 4, "bf16": 2, "fp16": 2}[self.name]
        if self.name == "fp8":
            return n * k + 4 * n
        if self.name == "int8":
            g = spec.group_size
            return n * k + (4 * (n // g) * (k // g) if g else 4 * n)
        if self.bits:
            groups = n * (k // spec.group_size)
            return n * k * self.bits // 8 + 2 * groups * (1 if spec.symmetric else 2)
        raise PolicyError(f"format {self.name!r} stores nothing of its own")

    def bits_per_weight(self, spec: Weights, shape: tuple[int, int]) -> float:
        return 8 * self.expected_bytes(spec, shape) / (shape[0] * shape[1])

    def quantize(self, w: torch.Tensor, spec: Weights) -> "PackedWeight":
        return PackedWeight(self, spec, tuple(w.shape), self.quantize_fn(w.detach(), spec), w.dtype)


class PackedWeight(nn.Module):
    """A quantized weight: its tensors are buffers (they move with `.to()`), not parameters."""

    def __init__(self, fmt: WeightFormat, spec: Weights, shape: tuple[int, int], tensors: dict, compute_dtype):
        super().__init__()
        self.fmt, self.spec, self.shape = fmt, spec, shape
        self.compute_dtype = compute_dtype  # the dtype activations arrive in
        self.names = tuple(tensors)
        for name, t in tensors.items():
            self.register_buffer(name, t.contiguous(), persistent=False)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.names}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def dequantize(self) -> torch.Tensor:
        """The exact reference weight this storage represents, float32 (N, K)."""
        return self.fmt.dequantize_fn(self.tensors, self.spec)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Dequantize only the given output rows (an embedding lookup): (n,) -> (n, K) float32."""
        if self.fmt.name == "int8" and self.spec.group_size:
            raise PolicyError("int8 block format cannot serve an embedding lookup; use int8 or int4")
        return self.fmt.dequantize_fn({name: v[rows] for name, v in self.tensors.items()}, self.spec)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        backend = MATMUL_BACKENDS.get((self.fmt.name, x.device.type), reference_matmul)
        return backend(self, x)

    def extra_repr(self) -> str:
        return f"{self.fmt.label(self.spec)}, shape={self.shape}, bytes={self.nbytes}"


def reference_matmul(w: PackedWeight, x: torch.Tensor) -> torch.Tensor:
    """Dequantize, then multiply: correct for every format on every device."""
    return F.linear(x, w.dequantize().to(x.dtype))


def _cast_matmul(w: PackedWeight, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.to(w.q.dtype), w.q).to(x.dtype)


def _int8pack_cpu(w: PackedWeight, x: torch.Tensor) -> torch.Tensor:
    """aten's int8 weight-only kernel: (x @ q.T) * scale, per-row scales only (no blocks)."""
    if w.spec.group_size or x.dtype != torch.float32:
        return reference_matmul(w, x)
    shape = x.shape
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).contiguous(), w.q, w.scale)
    return y.reshape(*shape[:-1], -1)


MATMUL_BACKENDS: dict[tuple[str, str], Callable[[PackedWeight, torch.Tensor], torch.Tensor]] = {
    ("fp32", "cpu"): _cast_matmul, ("bf16", "cpu"): _cast_matmul, ("fp16", "cpu"): _cast_matmul,
    ("fp32", "cuda"): _cast_matmul, ("bf16", "cuda"): _cast_matmul, ("fp16", "cuda"): _cast_matmul,
}
# Fast paths that exist but lose here: aten's CPU int8 kernel equals the reference, yet on a 2-core CPU it
# is no faster for one token and 8-12x slower for 128 (it loops over rows). Measured numbers in
# experiments/quantization/README.md; register it in MATMUL_BACKENDS to use it anyway.
OPTIONAL_BACKENDS = {("int8", "cpu"): _int8pack_cpu}


def _cast(dtype):
    return (lambda w, spec: {"q": w.to(dtype)}), (lambda t, spec: t["q"].float())


def _register() -> None:
    WEIGHT_FORMATS.register("none", WeightFormat("none", doc="the model's own weights and dtype",
                                                 kernel_family="dense"))
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        q, dq = _cast(dtype)
        WEIGHT_FORMATS.register(name, WeightFormat(name, q, dq, doc=f"a cast to {name}", kernel_family="dense"))
    WEIGHT_FORMATS.register("fp8", WeightFormat(
        "fp8", lambda w, spec: quant.quantize_fp8(w), lambda t, spec: quant.dequantize_fp8(t),
        doc="e4m3, per-row scale"))
    WEIGHT_FORMATS.register("int8", WeightFormat(
        "int8",
        lambda w, spec: quant.quantize_int8_block(w, spec.group_size) if spec.group_size
        else quant.quantize_int8_channel(w),
        lambda t, spec: quant.dequantize_int8_block(t) if spec.group_size else quant.dequantize_int8_channel(t),
        doc="symmetric, per-row scale or absmax per b x b block", kernel_family="int8"))
    # int8 in groups along K, one fp16 scale per group: llama.cpp's Q8_0 at g32 (exported bit for bit)
    WEIGHT_FORMATS.register("int8g", WeightFormat(
        "int8g", lambda w, spec: quant.quantize_grouped(w, 8, spec.group_size, spec.symmetric),
        lambda t, spec: quant.dequantize_grouped(t, 8),
        doc="int8 in groups of g along K (spelled int8-gN), fp16 scales, symmetric or asymmetric", bits=8,
        spelling="int8"))
    for bits in (4, 3, 2):  # int3/int2 have no GPU kernel yet: the reference path serves them, said once
        WEIGHT_FORMATS.register(f"int{bits}", WeightFormat(
            f"int{bits}", lambda w, spec, b=bits: quant.quantize_grouped(w, b, spec.group_size, spec.symmetric),
            lambda t, spec, b=bits: quant.dequantize_grouped(t, b),
            doc=f"groups of g along K, {bits}-bit codes packed densely, fp16 scales, symmetric or asymmetric",
            kernel_family="int4" if bits == 4 else None, bits=bits))


_register()
