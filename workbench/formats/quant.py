"""Weight quantization: pure functions to quantize, pack and dequantize a weight matrix (N, K).

Every format has an exact reference dequantization; the bytes stored are exactly the format's arithmetic
(packed data plus scales), so measured and computed sizes agree.

* ``fp32 bf16 fp16``  a cast.
* ``fp8``             e4m3 with one float32 scale per output row (amax / 448).
* ``int8``            symmetric, one float32 scale per output row (amax / 127); or, with a block size b,
                      absmax scales per b x b block (the seed's 64 x 64 blocks).
* ``int4``            groups of g along K (32/64/128/256), fp16 scales; symmetric (q in [-8, 7]) or
                      asymmetric (q in [0, 15] with an fp16 minimum per group, like llama.cpp's Q4_1).
                      Two values per byte, low nibble first.
* ``int3``, ``int2``  the same groups at 3 and 2 bits (q in [-4, 3] / [-2, 1], or [0, 7] / [0, 3] with a
                      minimum), packed densely: eight 3-bit values in three bytes, four 2-bit values in one
                      byte, element 0 in the lowest bits, so storage is exactly bits x weights.
"""
from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


# ---- int4 packing --------------------------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) integers in [0, 15] -> (N, K/2) uint8, element 2j in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 in [0, 15]."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)


PER_WORD = {4: 2, 3: 8, 2: 4}  # values per packed word; a word is bits x values / 8 bytes (1, 3, 1)


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) integers in [0, 2^bits) -> (N, K * bits / 8) uint8, element 0 of each word in its lowest bits
    (bits = 4 is `pack_int4`'s layout)."""
    if bits == 4:
        return pack_int4(q)
    if bits == 8:  # one code per byte
        return q.to(torch.uint8)
    n, k = q.shape
    per = PER_WORD[bits]
    words = q.to(torch.int32).reshape(n, k // per, per)
    word = (words << (bits * torch.arange(per, dtype=torch.int32, device=q.device))).sum(-1, dtype=torch.int32)
    out = torch.stack([(word >> (8 * j)) & 0xFF for j in range(per * bits // 8)], dim=-1)
    return out.reshape(n, -1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack_bits`: (N, K * bits / 8) uint8 -> (N, K) uint8."""
    if bits == 4:
        return unpack_int4(packed)
    if bits == 8:
        return packed
    n = packed.shape[0]
    per, nbytes = PER_WORD[bits], PER_WORD[bits] * bits // 8
    b = packed.to(torch.int32).reshape(n, -1, nbytes)
    word = (b << (8 * torch.arange(nbytes, dtype=torch.int32, device=packed.device))).sum(-1, dtype=torch.int32)
    vals = (word[..., None] >> (bits * torch.arange(per, dtype=torch.int32, device=packed.device))) & ((1 << bits) - 1)
    return vals.reshape(n, -1).to(torch.uint8)


# ---- per-format quantize / dequantize (float32 math; why: scales computed in low precision drift) -----------
def quantize_fp8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    w = w.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(1e-12)  # (N,)
    return {"q": (w / scale[:, None]).to(torch.float8_e4m3fn), "scale": scale}


def dequantize_fp8(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return t["q"].float() * t["scale"][:, None]


def quantize_int8_channel(w: torch.Tensor) -> dict[str, torch.Tensor]:
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)  # (N,)
    return {"q": (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), "scale": scale}


def dequantize_int8_channel(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return t["q"].float() * t["scale"][:, None]


def quantize_int8_block(w: torch.Tensor, block: int) -> dict[str, torch.Tensor]:
    n, k = w.shape
    blocks = w.float().reshape(n // block, block, k // block, block)  # (Nb, b, Kb, b)
    scale = (blocks.abs().amax(dim=(1, 3)) / 127).clamp_min(1e-12)  # (Nb, Kb)
    q = (blocks / scale[:, None, :, None]).round().clamp(-127, 127).to(torch.int8)
    return {"q": q.reshape(n, k), "scale": scale}


def dequantize_int8_block(t: dict[str, torch.Tensor]) -> torch.Tensor:
    q, scale = t["q"], t["scale"]
    nb, kb = scale.shape
    n, k = q.shape
    blocks = q.float().reshape(nb, n // nb, kb, k // kb) * scale[:, None, :, None]
    return blocks.reshape(n, k)


SCALE_SEARCH = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # candidate shrink factors of the absmax scale


def _best_of(candidates, g: torch.Tensor, quantize, weight: torch.Tensor | None = None):
    """Per group, the candidate whose round trip has the least squared error (a small grid search, as
    llama.cpp's make_qx_quants does, instead of plain absmax), each element's error times `weight`
    (broadcast to g's shape) when given."""
    best = best_err = None
    for cand in candidates:
        deq = quantize(cand)
        sq = (deq - g).pow(2)
        err = (sq if weight is None else sq * weight).sum(dim=-1)  # (N, G)
        if best is None:
            best, best_err = cand, err
            continue
        better = err < best_err
        best = tuple(torch.where(better, c, b) for c, b in zip(cand, best))
        best_err = torch.minimum(err, best_err)
    return best


# 2-3 bits clip harder at their best: the search reaches half the range there (int4's grid is unchanged)
LOW_BIT_SEARCH = SCALE_SEARCH + (0.7, 0.65, 0.6, 0.55, 0.5)


def quantize_grouped(w: torch.Tensor, bits: int, group: int, symmetric: bool = True,
                     importance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """int8/int4/int3/int2 in groups of `group` along K: fp16 scale (and minimum) per group, the scale searched
    per group for the least squared round-trip error; with `importance` (K,) (an input channel's mean
    squared activation: `formats.imatrix`) the error of each input channel counts that much."""
    n, k = w.shape
    levels, half = 1 << bits, 1 << (bits - 1)
    search = SCALE_SEARCH if bits >= 4 else LOW_BIT_SEARCH
    g = w.float().reshape(n, k // group, group)  # (N, G, g)
    weight = None if importance is None else importance.float().reshape(1, k // group, group)
    if symmetric:
        # signed absmax / -half uses every level (llama.cpp's Q4_0 trick); shrinking it clips outliers
        signed_max = g.gather(-1, g.abs().argmax(dim=-1, keepdim=True))[..., 0]
        def sym(c):
            d = c[0].float()[..., None]
            return (g / d).round().clamp(-half, half - 1) * d
        cands = [((signed_max / -half * f).half().masked_fill(signed_max == 0, 1e-8),) for f in search]
        (scale,) = _best_of(cands, g, sym, weight)
        q = (g / scale.float()[..., None]).round().clamp(-half, half - 1) + half
        return {"q": pack_bits(q.reshape(n, k), bits), "scale": scale}
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    def asym(c):
        d, m = c[0].float()[..., None], c[1].float()[..., None]
        return ((g - m) / d).round().clamp(0, levels - 1) * d + m
    cands = []
    for f in search:  # shrink the range symmetrically around its centre
        mid, span = (hi + lo) / 2, (hi - lo) / 2 * f
        cands.append((((2 * span) / (levels - 1)).clamp_min(1e-8).half(), (mid - span).half()))
    scale, lo = _best_of(cands, g, asym, weight)
    q = ((g - lo.float()[..., None]) / scale.float()[..., None]).round().clamp(0, levels - 1)
    return {"q": pack_bits(q.reshape(n, k), bits), "scale": scale, "min": lo}


def dequantize_grouped(t: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    q = unpack_bits(t["q"], bits).float()
    n, k = q.shape
    groups = t["scale"].shape[1]
    q = q.reshape(n, groups, k // groups)
    if "min" in t:
        w = q * t["scale"].float()[..., None] + t["min"].float()[..., None]
    else:
        w = (q - (1 << (bits - 1))) * t["scale"].float()[..., None]
    return w.reshape(n, k)


def quantize_int4(w: torch.Tensor, group: int, symmetric: bool = True) -> dict[str, torch.Tensor]:
    return quantize_grouped(w, 4, group, symmetric)


def dequantize_int4(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return dequantize_grouped(t, 4)


def int4_scale_and_zero(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """tinygemm's (K/g, N, 2) layout: w = (q - 8) * scale + zero, for aten._weight_int4pack_mm*."""
    scale = t["scale"].float()
    zero = t["min"].float() + 8 * scale if "min" in t else torch.zeros_like(scale)
    return torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous()


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(||w||^2 / ||w - w_q||^2)."""
    noise = (reference.float() - approx.float()).pow(2).sum().clamp_min(1e-30)
    return 10 * torch.log10(reference.float().pow(2).sum() / noise).item()
