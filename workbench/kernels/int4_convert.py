"""int4 nibbles to bf16/fp16 values in registers, the conversions every int4 kernel shares (`gemv_int4`).

Inline PTX: each nibble OR-ed into the mantissa of 128 (bf16) / 1024 (fp16), whose exponent bits `lop3`
sets for two values at once, then one packed subtract: exact small integers (q - 8, or q), no integer to
float conversion instruction. `ASM` False (Triton's interpreter) computes the same values with plain ops.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

ASM = os.environ.get("TRITON_INTERPRET", "0") != "1"  # inline PTX conversion (not in the interpreter)


def _nibbles_asm(one: str, minus: str | None, sub: str) -> str:
    """PTX for `nibbles`: the four bytes of a 32-bit register spread over two (prmt), each byte's low and
    then high nibble OR-ed into the exponent bits of `one` (lop3, two values at once: exactly one + q), then
    `minus` (one + 8: q - 8) or `one` itself (q) subtracted, packed."""
    regs, d = ("t0, t1, z, m, c, d", f" mov.b32 d, {minus};") if minus else ("t0, t1, z, m, c", "")
    return ("{\n" f".reg .b32 {regs};\n" f"mov.b32 z, 0; mov.b32 m, 0x000F000F; mov.b32 c, {one};{d}\n"
            "prmt.b32 t0, $4, z, 0x4140;\nprmt.b32 t1, $4, z, 0x4342;\n"
            "lop3.b32 $0, t0, m, c, 0xEA;\nlop3.b32 $1, t1, m, c, 0xEA;\n"
            "shr.b32 t0, t0, 4;\nshr.b32 t1, t1, 4;\n"
            "lop3.b32 $2, t0, m, c, 0xEA;\nlop3.b32 $3, t1, m, c, 0xEA;\n"
            + "".join(f"{sub} ${i}, ${i}, {'d' if minus else 'c'};\n" for i in range(4)) + "}")


_NIBBLES_BF16_SYM: tl.constexpr = tl.constexpr(_nibbles_asm("0x43004300", "0x43084308", "sub.rn.bf16x2"))
_NIBBLES_BF16: tl.constexpr = tl.constexpr(_nibbles_asm("0x43004300", None, "sub.rn.bf16x2"))
_NIBBLES_FP16_SYM: tl.constexpr = tl.constexpr(_nibbles_asm("0x64006400", "0x64086408", "sub.rn.f16x2"))
_NIBBLES_FP16: tl.constexpr = tl.constexpr(_nibbles_asm("0x64006400", None, "sub.rn.f16x2"))


@triton.jit
def nibbles(b, IS_BF16: tl.constexpr, SUB: tl.constexpr, ASM: tl.constexpr):
    """uint8 tile -> (low nibble, high nibble) as bf16/fp16 values v - SUB (SUB = 8: symmetric, 0: q).
    ASM=False: the same values through plain Triton ops (for the interpreter; more instructions)."""
    if not ASM:
        dt = tl.bfloat16 if IS_BF16 else tl.float16
        lo = ((b & 15).to(tl.int16) - SUB).to(dt)
        hi = ((b >> 4).to(tl.int16) - SUB).to(dt)
    elif IS_BF16:
        if SUB == 8:
            lo, hi = tl.inline_asm_elementwise(_NIBBLES_BF16_SYM, "=r,=r,=r,=r,r", [b],
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
        else:
            lo, hi = tl.inline_asm_elementwise(_NIBBLES_BF16, "=r,=r,=r,=r,r", [b], dtype=(tl.bfloat16, tl.bfloat16),
                                               is_pure=True, pack=4)
    else:
        if SUB == 8:
            lo, hi = tl.inline_asm_elementwise(_NIBBLES_FP16_SYM, "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16),
                                               is_pure=True, pack=4)
        else:
            lo, hi = tl.inline_asm_elementwise(_NIBBLES_FP16, "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16),
                                               is_pure=True, pack=4)
    return lo, hi


def _quarters_asm(one: str, one_plus_8: str, sub: str) -> str:
    """PTX for `quarters`: per 32-bit register (two int16), the four nibbles of each half OR-ed into the
    exponent bits of `one` (128 in bf16 / 1024 in fp16: exactly 128 + q), then `one_plus_8` subtracted."""
    steps = "".join(f"shr.b32 t, $4, {4 * i};\nlop3.b32 ${i}, t, m, c, 0xEA;\n" for i in range(1, 4))
    subs = "".join(f"{sub} ${i}, ${i}, d;\n" for i in range(4))
    return ("{\n.reg .b32 t, m, c, d;\n"
            f"mov.b32 m, 0x000F000F; mov.b32 c, {one}; mov.b32 d, {one_plus_8};\n"
            "lop3.b32 $0, $4, m, c, 0xEA;\n" + steps + subs + "}")


_QUARTERS_BF16: tl.constexpr = tl.constexpr(_quarters_asm("0x43004300", "0x43084308", "sub.rn.bf16x2"))
_QUARTERS_FP16: tl.constexpr = tl.constexpr(_quarters_asm("0x64006400", "0x64086408", "sub.rn.f16x2"))


@triton.jit
def quarters(w, IS_BF16: tl.constexpr, ASM: tl.constexpr):
    """int16 tile of the quarter layout -> its four nibbles as bf16/fp16 values q - 8 (four tiles of w's
    shape). ASM: per 32-bit register (two int16), three shifts, four lop3 that OR the exponent bits of 128
    (bf16) / 1024 (fp16) into two nibbles at once, and four packed subtracts: 11 instructions per 8 weights."""
    if not ASM:
        dt = tl.bfloat16 if IS_BF16 else tl.float16
        w0, w1 = ((w & 15) - 8).to(dt), (((w >> 4) & 15) - 8).to(dt)
        w2, w3 = (((w >> 8) & 15) - 8).to(dt), (((w >> 12) & 15) - 8).to(dt)
    elif IS_BF16:
        w0, w1, w2, w3 = tl.inline_asm_elementwise(_QUARTERS_BF16, "=r,=r,=r,=r,r", [w], dtype=(tl.bfloat16,) * 4,
                                                   is_pure=True, pack=2)
    else:
        w0, w1, w2, w3 = tl.inline_asm_elementwise(_QUARTERS_FP16, "=r,=r,=r,=r,r", [w], dtype=(tl.float16,) * 4,
                                                   is_pure=True, pack=2)
    return w0, w1, w2, w3
