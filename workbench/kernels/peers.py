"""Other libraries' low-bit GEMMs as tuner candidates: aten's tinygemm (int4, in torch) and gemlite.

The tuner (`kernels.quant_paths`) times each against our own kernels for every shape and token count and
keeps the fastest that computes the same weight. Both take our packed tensors, re-laid out once:

* tinygemm (`torch.ops.aten._weight_int4pack_mm`, bf16 only): fast at 1-2 tokens, collapses from ~4 on;
* gemlite (optional: `pip install gemlite`; a maintained Triton library): A16Wn for int4 groups (HQQ's
  w = (q - zero) * scale, our symmetric zero is 8, asymmetric zero = -min / scale), A16W8 for int8 per
  channel, on shapes it tiles exactly (`gemlite_fits`). Absent: skipped silently. Present but failing on
  a shape: skipped with one log line.
"""
from __future__ import annotations

import importlib.util
import logging
import os

import torch

log = logging.getLogger(__name__)
_SAID: set = set()


def say_once(key, message: str, *args) -> None:
    """Log `message` the first time `key` is seen in this process (a fallback is worth one line, not one
    per layer and step)."""
    if key not in _SAID:
        _SAID.add(key)
        log.warning(message, *args)


# ---- aten's tinygemm ---------------------------------------------------------------------------------------------
def tinygemm_fits(tensors: dict) -> bool:
    """Whether tinygemm takes this int4 weight (uint8 on CUDA, N a multiple of 8, K of 32, its group sizes)."""
    q = tensors["q"]
    if q.dtype != torch.uint8 or not q.is_cuda:
        return False
    n, k = q.shape[0], q.shape[1] * 2
    return k % 32 == 0 and n % 8 == 0 and k // tensors["scale"].shape[1] in (32, 64, 128, 256)


def tinygemm_pack(tensors: dict) -> tuple | None:
    """Our int4 tensors in tinygemm's layout (even k in the high nibble; scale and zero per group,
    w = (q - 8) * scale + zero); None where tinygemm cannot take the shape."""
    from workbench.formats.quant import int4_scale_and_zero, unpack_int4
    if not tinygemm_fits(tensors):
        return None
    q = tensors["q"]
    k = q.shape[1] * 2
    group = k // tensors["scale"].shape[1]
    inner = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
    try:
        u = unpack_int4(q).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack((u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8), inner)
        return packed, int4_scale_and_zero(tensors).to(torch.bfloat16), group
    except (RuntimeError, AttributeError):
        return None


def tinygemm(x: torch.Tensor, packed: tuple) -> torch.Tensor:
    weight, scale_zero, group = packed
    return torch.ops.aten._weight_int4pack_mm(x, weight, group, scale_zero)


# ---- gemlite -----------------------------------------------------------------------------------------------------
def gemlite_available() -> bool:
    return importlib.util.find_spec("gemlite") is not None and os.environ.get("WORKBENCH_GEMLITE", "1") != "0"


_GEMLITE_READY = False


def _gemlite():
    global _GEMLITE_READY
    import gemlite
    if not _GEMLITE_READY:  # its tuned launch configs; the H100's are the closest to an H200's
        name = "h100.json" if torch.cuda.get_device_capability()[0] >= 9 else "a100.json"
        path = os.path.join(os.path.dirname(gemlite.__file__), "configs", name)
        if os.path.exists(path):
            gemlite.load_config(path, print_error=False)
        _GEMLITE_READY = True
    return gemlite


# gemlite's split-K kernels read their group scales without a mask when K is not a multiple of
# BLOCK_SIZE_K x SPLIT_K (up to 4096 in its H100 configs), and may read past N's last tile: on SmolLM2's
# 576 x 576 at 27 tokens that was an illegal address, which no try/except survives (the CUDA context is
# lost for the process). So it is offered only on shapes every config of it tiles exactly.
GEMLITE_K_MULTIPLE, GEMLITE_N_MULTIPLE = 4096, 256


def gemlite_fits(tensors: dict, family: str, dtype: torch.dtype) -> bool:
    """Whether gemlite is installed, has a layout for this weight, and tiles its shape exactly (it may
    still refuse the shape)."""
    if not gemlite_available() or dtype not in (torch.bfloat16, torch.float16):
        return False
    q = tensors["q"]
    n, k = q.shape[0], q.shape[1] * (2 if family == "int4" else 1)
    if k % GEMLITE_K_MULTIPLE or n % GEMLITE_N_MULTIPLE:
        return False
    return family == "int4" or (family == "int8" and tensors["scale"].dim() == 1)  # no b x b block scales


def gemlite_layer(tensors: dict, family: str, dtype: torch.dtype):
    """A gemlite layer over our packed weight (a callable x -> y), or None (absent, or it refused)."""
    if not gemlite_fits(tensors, family, dtype):
        return None
    from workbench.formats.quant import unpack_int4
    shape = tuple(tensors["q"].shape)
    try:
        helper = _gemlite().helper
        if family == "int8":
            return helper.A16W8_INT8(dtype=dtype).from_weights(tensors["q"], scales=tensors["scale"][:, None].to(dtype))
        q = unpack_int4(tensors["q"])
        k = q.shape[1]
        group = k // tensors["scale"].shape[1]
        scale = tensors["scale"].to(dtype)
        zero = (-tensors["min"].float() / tensors["scale"].float()).to(dtype) if "min" in tensors \
            else torch.full_like(scale, 8)
        return helper.A16Wn(dtype=dtype).from_weights(q, scale, zero, W_nbits=4, group_size=group)
    except Exception as e:  # noqa: BLE001 - an optional peer: any failure means "not for this shape"
        say_once(("gemlite", family, shape), "gemlite skipped for %s %s: %s", family, shape,
                 f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        return None
