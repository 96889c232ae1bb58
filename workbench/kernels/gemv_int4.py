"""int4 (groups of g along K) weight-only GEMV/GEMM for decode batches (1-64 tokens).

Our format (`workbench.formats.quant.quantize_int4`): "q" uint8 (N, K/2), even k in the low nibble;
"scale" fp16 (N, K/g); symmetric w = (q - 8) * scale, or asymmetric with "min" fp16 (N, K/g),
w = q * scale + min. Reference: `workbench.formats.quant.dequantize_int4`, then x @ w.T.

`pack` repacks once, same bytes (N*K/2 + 2*N*K/g, + 2*N*K/g with min):
* "qp" uint8 (N, K/2): inside each row's group of g values, byte j holds k = j (low nibble) and
  k = j + g/2 (high nibble) (`layouts.repack_int4_g`), so a group's low nibbles meet the contiguous first
  half of the group's x and the high nibbles the second half;
* "scale_t" (and "min_t") fp16 (K/g, N): a group's scales for a block of rows are one coalesced load.

The kernel: a program owns BLOCK_N rows and walks a range of groups (one or, `pair`, two a step); per
group it loads the (BLOCK_N, g/2) byte tile (cp.async, `num_stages` deep) and turns each 4 bytes into
8 bf16/fp16 values with a few integer ops in registers (inline PTX: prmt + lop3 with the exponent bits
of 128 (bf16) / 1024 (fp16) OR-ed in, then one packed subtract: exact small integers, q - 8 or q). Then
two `tl.dot`s with the two halves of the token tile, (BLOCK_T, g/2) x (g/2, BLOCK_N), in one of two modes:
* exact (`scaled=False`): into a per-group float32 partial that is scaled (asymmetric: plus
  min * sum(x)) into the accumulator: the products q * x are exact and the scale is applied in float32,
  as in the float32 reference (rel. err. 1.7e-3 in the H200 runs, the bf16 output rounding);
* scaled (`scaled=True`, the symmetric default): w = (q - 8) * s dequantized to bf16/fp16 in registers
  (the fp16 scale rounded to bf16 first) and accumulated straight into one float32 accumulator, the
  usual mixed-input GEMM math (rel. err. 2.7e-3 measured). Not offered for asymmetric weights.
The next step's scales are prefetched one step ahead. Split-K as in `layouts.store_tile`.
Limits: group in (32, 64, 128) dividing K; M <= 64; any N.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from workbench.kernels.layouts import (quarter_pack, repack_int4_g, sm_count, split_outputs, split_plan, splits_for,
                                       store_tile, unpack_int4_g)
from workbench.kernels.int4_convert import ASM as _ASM, nibbles as _nibbles, quarters as _quarters
from workbench.kernels.pdl import enter, launch_kwargs, prefetch_l2

MAX_TOKENS = 64
PREFETCH_STEPS: tl.constexpr = tl.constexpr(4)  # steps per row prefetched before the launch wait (PDL)
GROUPS = (32, 64, 128)
WA_GROUPS = (64, 128)  # the weight-as-A kernel's quarters of a group must be >= 16 inputs (one MMA step)


@triton.jit
def _group_tile(b, xl, xh, s, mn, IS_BF16: tl.constexpr, HAS_MIN: tl.constexpr, ASM: tl.constexpr,
                SCALED: tl.constexpr, acc):
    """One group: acc + x_group @ w_group^T for a (BLOCK_N, g/2) byte tile b and the two x halves.
    SCALED=False: exact, per-group float32 partial of integer weights, scaled (and + min * sum x) in
    float32. SCALED=True: the weights are dequantized in registers, w = (q - 8) * s (or q * s + min)
    rounded to bf16/fp16, and accumulated straight into acc (fewer instructions, one rounding of w)."""
    dt = tl.bfloat16 if IS_BF16 else tl.float16
    if HAS_MIN:
        lo, hi = _nibbles(b, IS_BF16, 0, ASM)
    else:
        lo, hi = _nibbles(b, IS_BF16, 8, ASM)
    if SCALED:
        sd = s.to(dt)[:, None]
        if HAS_MIN:
            md = mn.to(dt)[:, None]
            lo = lo * sd + md
            hi = hi * sd + md
        else:
            lo = lo * sd
            hi = hi * sd
        acc = tl.dot(xl, tl.trans(lo.to(dt)), acc)
        acc = tl.dot(xh, tl.trans(hi.to(dt)), acc)
    else:
        d = tl.dot(xl, tl.trans(lo))
        d = tl.dot(xh, tl.trans(hi), d)
        if HAS_MIN:
            xsum = tl.sum(xl.to(tl.float32), axis=1) + tl.sum(xh.to(tl.float32), axis=1)
            acc += d * s[None, :] + xsum[:, None] * mn[None, :]
        else:
            acc += d * s[None, :]
    return acc


@triton.jit(do_not_specialize=["M", "GSTEPS", "n_split"])
def _w4_gemv_kernel(x_ptr, q_ptr, s_ptr, m_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, stride_xm, stride_ym, GSTEPS, n_split,
               GROUP: tl.constexpr, HAS_MIN: tl.constexpr, IS_BF16: tl.constexpr, BLOCK_T: tl.constexpr,
               BLOCK_N: tl.constexpr, USE_WS: tl.constexpr, ASM: tl.constexpr, SCALED: tl.constexpr,
               PAIR: tl.constexpr, TWO: tl.constexpr, PDL: tl.constexpr):
    """GSTEPS loop steps per split, each of one group (PAIR: two groups); TWO: the tokens as two halves
    sharing the converted weights (SCALED only)."""
    HALF: tl.constexpr = GROUP // 2
    GPS: tl.constexpr = 2 if PAIR else 1
    HT: tl.constexpr = BLOCK_T // 2 if TWO else BLOCK_T
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N
    offs_h = tl.arange(0, HT)
    offs_j = tl.arange(0, HALF)
    n_steps = K // GROUP // GPS  # launch guarantees divisibility for PAIR
    g_lo = pid_k * GSTEPS
    n_it = n_steps - g_lo
    if n_it > GSTEPS:
        n_it = GSTEPS
    g_lo = g_lo * GPS  # first group of this split
    w_ptrs = q_ptr + rn.to(tl.int64)[:, None] * (K // 2) + g_lo * HALF + offs_j[None, :]
    x_ptrs = x_ptr + offs_h[:, None] * stride_xm + g_lo * GROUP + offs_j[None, :]
    prefetch_l2(q_ptr + rn.to(tl.int64) * (K // 2) + g_lo * HALF, tl.minimum(n_it, PREFETCH_STEPS) * (GPS * HALF), PDL)
    enter(PDL)
    t0 = (offs_h < M)[:, None]
    t1 = (offs_h + HT < M)[:, None]
    s0 = tl.load(s_ptr + g_lo * N + rn).to(tl.float32)
    m0 = s0
    if HAS_MIN:
        m0 = tl.load(m_ptr + g_lo * N + rn).to(tl.float32)
    if PAIR:
        s1 = tl.load(s_ptr + (g_lo + 1) * N + rn).to(tl.float32)
        m1 = s1
        if HAS_MIN:
            m1 = tl.load(m_ptr + (g_lo + 1) * N + rn).to(tl.float32)
    acc = tl.zeros([HT, BLOCK_N], dtype=tl.float32)
    acc1 = tl.zeros([HT, BLOCK_N], dtype=tl.float32)
    for i in range(0, n_it):
        # the next step's scales, one step ahead (their latency hides behind this step)
        nxt = g_lo + (i + 1) * GPS
        if i + 1 >= n_it:
            nxt = g_lo + i * GPS
        s0n = tl.load(s_ptr + nxt * N + rn).to(tl.float32)
        m0n = s0n
        if HAS_MIN:
            m0n = tl.load(m_ptr + nxt * N + rn).to(tl.float32)
        if PAIR:
            s1n = tl.load(s_ptr + (nxt + 1) * N + rn).to(tl.float32)
            m1n = s1n
            if HAS_MIN:
                m1n = tl.load(m_ptr + (nxt + 1) * N + rn).to(tl.float32)
        b = tl.load(w_ptrs)
        xl = tl.load(x_ptrs, mask=t0, other=0.0)
        xh = tl.load(x_ptrs + HALF, mask=t0, other=0.0)
        acc = _group_tile(b, xl, xh, s0, m0, IS_BF16, HAS_MIN, ASM, SCALED, acc)
        if TWO:
            xl1 = tl.load(x_ptrs + HT * stride_xm, mask=t1, other=0.0)
            xh1 = tl.load(x_ptrs + HT * stride_xm + HALF, mask=t1, other=0.0)
            acc1 = _group_tile(b, xl1, xh1, s0, m0, IS_BF16, HAS_MIN, ASM, SCALED, acc1)
        if PAIR:
            b2 = tl.load(w_ptrs + HALF)
            xl2 = tl.load(x_ptrs + GROUP, mask=t0, other=0.0)
            xh2 = tl.load(x_ptrs + GROUP + HALF, mask=t0, other=0.0)
            acc = _group_tile(b2, xl2, xh2, s1, m1, IS_BF16, HAS_MIN, ASM, SCALED, acc)
            if TWO:
                xl3 = tl.load(x_ptrs + HT * stride_xm + GROUP, mask=t1, other=0.0)
                xh3 = tl.load(x_ptrs + HT * stride_xm + GROUP + HALF, mask=t1, other=0.0)
                acc1 = _group_tile(b2, xl3, xh3, s1, m1, IS_BF16, HAS_MIN, ASM, SCALED, acc1)
            s1 = s1n
            m1 = m1n
        s0 = s0n
        m0 = m0n
        w_ptrs += GPS * HALF
        x_ptrs += GPS * GROUP
    if TWO:
        full = tl.reshape(tl.permute(tl.join(acc, acc1), (2, 0, 1)), (BLOCK_T, BLOCK_N))
    else:
        full = acc
    store_tile(full, y_ptr, ws_ptr, lock_ptr, tl.arange(0, BLOCK_T), offs_n, M, N, stride_ym, pid_n, pid_k, n_split,
               USE_WS=USE_WS, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N)


@triton.jit(do_not_specialize=["GSTEPS", "n_split"])
def _w4_cc_kernel(x_ptr, q_ptr, s_ptr, y_ptr, ws_ptr, lock_ptr, N, K, stride_ym, GSTEPS, n_split,
                  GROUP: tl.constexpr, GPS: tl.constexpr, IS_BF16: tl.constexpr, BLOCK_N: tl.constexpr,
                  USE_WS: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
    """One token on the CUDA cores (no tensor cores, no 16-row padding, no shared-memory operand): a
    program owns BLOCK_N rows and walks its groups GPS at a time as one (BLOCK_N, GPS, g/2) byte tile, the
    nibbles turned into bf16/fp16 values q - 8 by `_nibbles`, multiplied with x in float32 and summed per
    group, then scaled by the group's scale in float32 (the exact mode's math). The tensor-core kernels
    spend a 16-row MMA on one token; this one spends about three instructions per weight."""
    HALF: tl.constexpr = GROUP // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N
    offs_g = tl.arange(0, GPS)
    offs_j = tl.arange(0, HALF)
    n_steps = K // GROUP // GPS  # launch guarantees divisibility
    g_lo = pid_k * GSTEPS
    n_it = n_steps - g_lo
    if n_it > GSTEPS:
        n_it = GSTEPS
    g0 = g_lo * GPS  # first group of this split
    row = q_ptr + rn.to(tl.int64) * (K // 2) + g0 * HALF
    w_ptrs = row[:, None, None] + (offs_g * HALF)[None, :, None] + offs_j[None, None, :]
    x_ptrs = x_ptr + (g0 + offs_g)[:, None] * GROUP + offs_j[None, :]
    s_ptrs = s_ptr + (g0 + offs_g)[None, :] * N + rn[:, None]
    prefetch_l2(row, tl.minimum(n_it, PREFETCH_STEPS) * (GPS * HALF), PDL)
    enter(PDL)
    acc = tl.zeros([BLOCK_N, GPS], dtype=tl.float32)
    for i in range(0, n_it):
        b = tl.load(w_ptrs)
        s = tl.load(s_ptrs).to(tl.float32)
        xl = tl.load(x_ptrs).to(tl.float32)[None, :, :]
        xh = tl.load(x_ptrs + HALF).to(tl.float32)[None, :, :]
        lo, hi = _nibbles(b, IS_BF16, 8, ASM)
        acc += tl.sum(lo.to(tl.float32) * xl + hi.to(tl.float32) * xh, axis=2) * s
        w_ptrs += GPS * HALF
        x_ptrs += GPS * GROUP
        s_ptrs += GPS * N
    y = tl.sum(acc, axis=1)
    store_tile(y[None, :], y_ptr, ws_ptr, lock_ptr, tl.arange(0, 1), offs_n, 1, N, stride_ym, pid_n, pid_k, n_split,
               USE_WS=USE_WS, BLOCK_T=1, BLOCK_N=BLOCK_N)


@triton.jit(do_not_specialize=["M", "GSTEPS", "n_split"])
def _w4_wa_kernel(x_ptr, q_ptr, s_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, stride_xm, stride_ym, GSTEPS, n_split,
                  GROUP: tl.constexpr, IS_BF16: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                  USE_WS: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
    """The weight as the A operand (symmetric groups of 64 or 128): per group, y^T (BLOCK_N, BLOCK_T) +=
    W_quarter (BLOCK_N, g/4) x x_quarter^T (g/4, BLOCK_T) for its four quarters. The dequantized weight
    stays in registers as the register operand of the MMA (wgmma takes A from registers), so it never
    makes the trip through shared memory that the weight-as-B kernel needs; x^T is the shared-memory
    operand. Weights in the quarter layout (`quarter_pack`): one int16 holds a row's nibbles for k = j,
    j + g/4, j + g/2, j + 3g/4 of its group, so a thread's A fragment (two consecutive k) is one 32-bit
    load that turns into eight weights. The group's scale multiplies the weight in registers."""
    Q: tl.constexpr = GROUP // 4
    dt = tl.bfloat16 if IS_BF16 else tl.float16
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N
    offs_t = tl.arange(0, BLOCK_T)
    offs_j = tl.arange(0, Q)
    g_lo = pid_k * GSTEPS
    n_it = K // GROUP - g_lo
    if n_it > GSTEPS:
        n_it = GSTEPS
    row = q_ptr + rn.to(tl.int64) * (K // 4) + g_lo * Q  # int16 elements
    w_ptrs = row[:, None] + offs_j[None, :]
    x_ptrs = x_ptr + offs_t[None, :] * stride_xm + g_lo * GROUP + offs_j[:, None]
    t_mask = (offs_t < M)[None, :]
    prefetch_l2(row, tl.minimum(n_it, PREFETCH_STEPS) * (2 * Q), PDL)
    enter(PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
    for i in range(0, n_it):
        w = tl.load(w_ptrs)
        sd = tl.load(s_ptr + (g_lo + i) * N + rn).to(dt)[:, None]
        x0 = tl.load(x_ptrs, mask=t_mask, other=0.0)
        x1 = tl.load(x_ptrs + Q, mask=t_mask, other=0.0)
        x2 = tl.load(x_ptrs + 2 * Q, mask=t_mask, other=0.0)
        x3 = tl.load(x_ptrs + 3 * Q, mask=t_mask, other=0.0)
        w0, w1, w2, w3 = _quarters(w, IS_BF16, ASM)
        acc = tl.dot((w0 * sd).to(dt), x0, acc)
        acc = tl.dot((w1 * sd).to(dt), x1, acc)
        acc = tl.dot((w2 * sd).to(dt), x2, acc)
        acc = tl.dot((w3 * sd).to(dt), x3, acc)
        w_ptrs += Q
        x_ptrs += GROUP
    store_tile(tl.trans(acc), y_ptr, ws_ptr, lock_ptr, offs_t, offs_n, M, N, stride_ym, pid_n, pid_k, n_split,
               USE_WS=USE_WS, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N)


def pack(tensors: dict) -> dict:
    """Our int4 tensors -> the kernel layout (same bytes; see the module docstring)."""
    q, scale = tensors["q"], tensors["scale"]
    if q.dtype != torch.uint8 or q.dim() != 2 or scale.dim() != 2 or scale.shape[0] != q.shape[0]:
        raise ValueError("gemv_int4.pack needs q uint8 (N, K/2) and scale (N, K/g)")
    k = 2 * q.shape[1]
    group = k // scale.shape[1]
    if group not in GROUPS or k % group:
        raise ValueError(f"gemv_int4 supports groups {GROUPS} dividing K, got K={k}, group={group}")
    out = {"qp": repack_int4_g(q, group), "scale_t": scale.to(torch.float16).t().contiguous(), "group": group, "k": k}
    if "min" in tensors:
        out["min_t"] = tensors["min"].to(torch.float16).t().contiguous()
    elif group in WA_GROUPS:  # the weight-as-A kernel's copy (symmetric only)
        out["qq"] = quarter_pack(q, group)
    return out


def nbytes(packed: dict) -> int:
    """The bytes one launch reads ("qq" is the same weight in the weight-as-A layout)."""
    return sum(packed[key].numel() * packed[key].element_size() for key in ("qp", "scale_t", "min_t") if key in packed)


def unpack(packed: dict) -> dict:
    """The kernel layout back to our format (tests: the round trip is exact)."""
    qv = unpack_int4_g(packed["qp"], packed["group"])
    out = {"q": (qv[:, 0::2] | (qv[:, 1::2] << 4)).contiguous(), "scale": packed["scale_t"].t().contiguous()}
    if "min_t" in packed:
        out["min"] = packed["min_t"].t().contiguous()
    return out


def block_t(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def candidates(m: int, n: int, k: int, group: int, device, asym: bool = False) -> list[dict]:
    """Launch configs worth timing; the first is the untuned default. scaled: dequantize-then-dot (the
    scale rounded to bf16/fp16, w = (q - 8) * s rounded once); exact: integer-weight partials scaled in
    float32. Asymmetric weights get the exact mode only (q * s + min in bf16 cancels: rel. err. up to
    6.5e-3 measured, against 1.7e-3 exact)."""
    bt = block_t(m)
    pair = (k // group) % 2 == 0
    if bt <= 32:  # (block_n, warps, stages, scaled, pair, two halves)
        shapes = [(128, 4, 4, True, pair, False), (256, 8, 4, True, pair, False), (128, 4, 6, True, pair, False),
                  (128, 4, 4, False, False, False), (256, 8, 4, False, False, False), (128, 4, 4, True, False, False)]
    else:  # two halves spill at 64 tokens (SASS), not offered
        shapes = [(128, 4, 3, True, pair, False), (128, 4, 3, False, False, False), (64, 4, 4, True, pair, False),
                  (256, 8, 3, True, False, False)]
    if asym:
        shapes = [sh for sh in shapes if not sh[3]] + [(64, 4, 4, False, False, False)]
    sms = sm_count(device)
    out = []
    for bn, w, s, scaled, pr, two in shapes:
        steps = (k // group) // (2 if pr else 1)
        tiles = triton.cdiv(n, bn)
        sp = splits_for(tiles, steps, sms)
        sp.sort(key=lambda s_: abs(tiles * s_ - 2 * sms))
        out += [dict(block_n=bn, warps=w, stages=s, split=s_, scaled=scaled, pair=pr, two=two) for s_ in sp]
    if m == 1 and not asym:  # one token on the CUDA cores: (block_n, groups a step, warps, stages); the two
        # that won on the H200 (of five), and one group a step where the group count is odd
        for bn, gps, w, s in ((128, 2, 8, 3), (64, 2, 4, 4), (64, 1, 4, 4)):
            if (k // group) % gps or (gps == 1 and (k // group) % 2 == 0):
                continue
            tiles = triton.cdiv(n, bn)
            sp = splits_for(tiles, (k // group) // gps, sms)
            sp.sort(key=lambda s_: abs(tiles * s_ - 2 * sms))
            out += [dict(cc=True, block_n=bn, gps=gps, warps=w, stages=s, split=s_) for s_ in sp[:3]]
    if not asym and group in WA_GROUPS:  # weight as A, after the untuned default: (block_n, warps, stages)
        for bn, w, s in ((128, 4, 4), (256, 8, 4), (256, 4, 3)) if bt <= 32 else ((128, 4, 3), (256, 8, 3)):
            tiles = triton.cdiv(n, bn)
            sp = splits_for(tiles, k // group, sms)
            sp.sort(key=lambda s_: abs(tiles * s_ - 2 * sms))
            out += [dict(wa=True, block_n=bn, warps=w, stages=s, split=s_) for s_ in sp[:3]]
    return out


def launch(x: torch.Tensor, packed: dict, cfg: dict, y: torch.Tensor | None = None) -> torch.Tensor:
    if cfg.get("wa"):
        return _launch_wa(x, packed, cfg, y)
    if cfg.get("cc"):
        return _launch_cc(x, packed, cfg, y)
    qp, st = packed["qp"], packed["scale_t"]
    mt = packed.get("min_t")
    group = packed["group"]
    m, k = x.shape
    n = qp.shape[0]
    bt, bn = block_t(m), cfg["block_n"]
    pair = bool(cfg.get("pair")) and (k // group) % 2 == 0
    scaled = bool(cfg.get("scaled", False))
    two = bool(cfg.get("two")) and scaled and bt >= 32
    steps, n_split = split_plan((k // group) // (2 if pair else 1), cfg["split"])
    tiles = triton.cdiv(n, bn)
    y, ws, lk, use_ws = split_outputs(x, m, n, tiles, n_split, bt, bn, y)
    _w4_gemv_kernel[(tiles, n_split)](x, qp, st, st if mt is None else mt, y, ws, lk, m, n, k, x.stride(0), y.stride(0),
                                 steps, n_split, GROUP=group, HAS_MIN=mt is not None,
                                 IS_BF16=x.dtype == torch.bfloat16, BLOCK_T=bt, BLOCK_N=bn, USE_WS=use_ws,
                                 ASM=cfg.get("asm", _ASM), SCALED=scaled, PAIR=pair, TWO=two,
                                 num_warps=cfg["warps"], num_stages=cfg["stages"], **launch_kwargs(x.device))
    return y


def _launch_wa(x: torch.Tensor, packed: dict, cfg: dict, y: torch.Tensor | None = None) -> torch.Tensor:
    qq, st, group = packed["qq"], packed["scale_t"], packed["group"]
    m, k = x.shape
    n = qq.shape[0]
    bt, bn = block_t(m), cfg["block_n"]
    steps, n_split = split_plan(k // group, cfg["split"])
    tiles = triton.cdiv(n, bn)
    y, ws, lk, use_ws = split_outputs(x, m, n, tiles, n_split, bt, bn, y)
    _w4_wa_kernel[(tiles, n_split)](x, qq, st, y, ws, lk, m, n, k, x.stride(0), y.stride(0), steps, n_split,
                                    GROUP=group, IS_BF16=x.dtype == torch.bfloat16, BLOCK_T=bt, BLOCK_N=bn,
                                    USE_WS=use_ws, ASM=cfg.get("asm", _ASM), num_warps=cfg["warps"],
                                    num_stages=cfg["stages"], **launch_kwargs(x.device))
    return y


def _launch_cc(x: torch.Tensor, packed: dict, cfg: dict, y: torch.Tensor | None = None) -> torch.Tensor:
    qp, st, group = packed["qp"], packed["scale_t"], packed["group"]
    m, k = x.shape
    n, gps = qp.shape[0], cfg["gps"]
    if m != 1 or "min_t" in packed or (k // group) % gps:
        raise ValueError(f"the CUDA-core int4 kernel takes one token, symmetric groups, {gps} groups dividing K")
    bn = cfg["block_n"]
    steps, n_split = split_plan((k // group) // gps, cfg["split"])
    tiles = triton.cdiv(n, bn)
    y, ws, lk, use_ws = split_outputs(x, m, n, tiles, n_split, 1, bn, y)
    _w4_cc_kernel[(tiles, n_split)](x, qp, st, y, ws, lk, n, k, y.stride(0), steps, n_split, GROUP=group, GPS=gps,
                                    IS_BF16=x.dtype == torch.bfloat16, BLOCK_N=bn, USE_WS=use_ws,
                                    ASM=cfg.get("asm", _ASM), num_warps=cfg["warps"], num_stages=cfg["stages"],
                                    **launch_kwargs(x.device))
    return y


def gemv(x: torch.Tensor, packed: dict, config: dict | None = None) -> torch.Tensor:
    """x (M, K) bf16/fp16, M <= 64 -> (M, N) in x's dtype, = x @ dequantize_int4(tensors).T."""
    if x.dim() != 2 or x.shape[0] > MAX_TOKENS or x.shape[1] != packed["k"]:
        raise ValueError(f"gemv_int4 takes x (M <= {MAX_TOKENS}, K={packed['k']}), got {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError("gemv_int4 takes bf16/fp16 activations")
    x = x if x.stride(1) == 1 else x.contiguous()
    if config is None:
        m, k = x.shape
        n = packed["qp"].shape[0]
        cands = candidates(m, n, k, packed["group"], x.device, asym="min_t" in packed)
        if os.environ.get("WORKBENCH_TUNE", "1") == "0":
            config = cands[0]
        else:
            from workbench.kernels.tuning import tuned
            config = tuned(("gemv_int4", block_t(m), "min_t" in packed, packed["group"], m, n, k, x.dtype), cands,
                           lambda c: launch(x, packed, c))
    return launch(x, packed, config)


def reference(x: torch.Tensor, tensors: dict) -> torch.Tensor:
    """float64 x @ dequantize_int4(tensors).T (our format's tensors), as float32."""
    from workbench.formats.quant import dequantize_int4
    return (x.double() @ dequantize_int4(tensors).double().T).float()
