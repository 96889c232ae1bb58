"""Compile-only check of the GEMV kernels for sm_90 (no GPU needed): registers, spills, shared memory, and the
instruction mix of the main loop per weight byte, from the SASS that Triton's own ptxas/cuobjdump produce.

    python experiments/speed/kernels/sass_report.py [--family int8|int4|sparse] [--dump NAME]

Needs Triton (3.6 here, as on the H200 image). What it tells: whether loads are 16-byte cp.async, whether the
dot is HMMA or HGMMA, and how many warp instructions each weight byte costs (an SM issues at most 4 a cycle,
and at ~4 TB/s an H200 SM must take ~17 bytes a cycle, so above ~0.2 instructions/byte issue becomes a limit).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")


def _compile(fn, sig, consts, warps, stages, div, pdl=False):
    consts = {**consts, "PDL": pdl}
    names = list(sig)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in div}
    sig = dict(sig)
    for c in consts:
        sig[c] = "constexpr"
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages, launch_pdl=pdl))


def _sass(c):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(c.asm["cubin"])
    out = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    return out, res


def report(name, c, warps, bytes_per_iter):
    out, res = _sass(c)
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"^\s+/\*([0-9a-f]+)\*/\s+(.*?);", out, re.M)]
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    loops = []
    for addr, t in ins:
        if "BRA" in t:
            m = re.search(r"(0x[0-9a-f]+)", t)
            if m and int(m.group(1), 16) < addr:
                loops.append((int(m.group(1), 16), addr))
    tgt, end = max(loops, key=lambda p: p[1] - p[0]) if loops else (0, 0)
    ops = Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for a, t in ins if tgt <= a <= end)
    n = sum(ops.values())
    key = {k: v for k, v in ops.items() if k.startswith(("LDG", "LDS", "HMMA", "HGMMA", "STS", "PRMT", "LOP3", "HADD2",
                                                        "FFMA", "IMAD.MOV", "SHF"))}
    print(f"{name:44s} regs={usage.group(1)} stack={usage.group(2)} local={usage.group(4)} smem={c.metadata.shared:6d} "
          f"loop={n:4d} instr  {n * warps / bytes_per_iter:.3f} warp-instr/B  {dict(sorted(key.items()))}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="all")
    ap.add_argument("--dump", default=None, help="print the SASS of the config whose name contains this")
    ap.add_argument("--pdl", action="store_true", help="compile the programmatic-dependent-launch variants")
    args = ap.parse_args()
    from workbench.kernels import gemv_int4, gemv_int8, gemv_sparse
    base = {"M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32"}
    div = ["x_ptr", "y_ptr", "ws_ptr", "lock_ptr", "N", "K", "stride_xm", "stride_ym"]
    jobs = []
    if args.family in ("all", "int8"):
        sig = {"x_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp32", "y_ptr": "*bf16", "ws_ptr": "*fp32", "lock_ptr": "*i32",
               **base, "STEPS": "i32", "n_split": "i32"}
        for m in (1, 32, 64):
            for cfg in {(c["block_n"], c["block_k"], c["warps"], c["stages"], bool(c.get("two")))
                        for c in gemv_int8.candidates(m, 4096, 4096, "cpu")}:
                bn, bk, w, s, two = cfg
                for ws in (True,):
                    consts = dict(BLOCK_T=gemv_int8.block_t(m), BLOCK_N=bn, BLOCK_K=bk, USE_WS=ws, EVEN_K=True, TWO=two)
                    jobs.append((f"int8 T{consts['BLOCK_T']} N{bn} K{bk} w{w} s{s} two{int(two)}", gemv_int8._w8_gemv_kernel, sig,
                                 consts, w, s, div + ["q_ptr", "s_ptr"], bn * bk))
    if args.family in ("all", "int4"):
        sig = {"x_ptr": "*bf16", "q_ptr": "*u8", "s_ptr": "*fp16", "m_ptr": "*fp16", "y_ptr": "*bf16", "ws_ptr": "*fp32",
               "lock_ptr": "*i32", **base, "GSTEPS": "i32", "n_split": "i32"}
        for m in (1, 32, 64):
            for cfg in {(c["block_n"], c["warps"], c["stages"], c["scaled"], c["pair"], c["two"])
                        for c in gemv_int4.candidates(m, 4096, 4096, 64, "cpu") if not c.get("wa")}:
                bn, w, s, scaled, pair, two = cfg
                for has_min in (False,):
                    consts = dict(GROUP=64, HAS_MIN=has_min, IS_BF16=True, BLOCK_T=gemv_int4.block_t(m), BLOCK_N=bn, USE_WS=True,
                                  ASM=True, SCALED=scaled, PAIR=pair, TWO=two and scaled and m > 16)
                    jobs.append((f"int4 T{consts['BLOCK_T']} N{bn} w{w} s{s} sc{int(scaled)} pr{int(pair)} two{int(consts['TWO'])}",
                                 gemv_int4._w4_gemv_kernel, sig, consts, w, s, div + ["q_ptr", "s_ptr", "m_ptr"],
                                 bn * 32 * (2 if pair else 1)))
        wsig = {k_: v for k_, v in sig.items() if k_ != "m_ptr"} | {"q_ptr": "*i16"}
        for m in (1, 32, 64):
            for c in [c for c in gemv_int4.candidates(m, 4096, 4096, 64, "cpu") if c.get("wa")]:
                consts = dict(GROUP=64, IS_BF16=True, BLOCK_T=gemv_int4.block_t(m), BLOCK_N=c["block_n"], USE_WS=True,
                              ASM=True)
                name = f"int4 weight-as-A T{consts['BLOCK_T']} N{c['block_n']} w{c['warps']} s{c['stages']}"
                if name not in {j[0] for j in jobs}:
                    jobs.append((name, gemv_int4._w4_wa_kernel, wsig, consts, c["warps"], c["stages"],
                                 div + ["q_ptr", "s_ptr"], c["block_n"] * 32))
    if args.family in ("all", "sparse"):
        for wdt in ("bf16", "i8"):
            sig = {"x_ptr": "*bf16", "t_ptr": "*fp32", "w_ptr": f"*{wdt}", "s_ptr": "*fp32", "y_ptr": "*bf16", "ws_ptr": "*fp32",
                   "lock_ptr": "*i32", **base, "STEPS": "i32", "n_split": "i32"}
            for m in (1, 8):
                for c in {(c["kind"], c["block_n"], c["block_k"], c["warps"], c["stages"], c.get("slab", 0))
                          for c in gemv_sparse.candidates(m, 4096, 4096, wdt == "i8", "cpu")}:
                    kind, bn, bk, w, s, slab = c
                    if kind in gemv_sparse.GATHER_MODES:
                        gsig = {k_: v for k_, v in sig.items() if k_ != "STEPS"}
                        gsig = dict(list(gsig.items())[:7] + [("idx_ptr", "*i32")] + list(gsig.items())[7:])
                        consts = dict(HAS_SCALE=wdt == "i8", SLAB=slab, BLOCK_N=bn, BLOCK_K=bk, USE_WS=True,
                                      MODE=gemv_sparse.GATHER_MODES[kind])
                        jobs.append((f"sparse {wdt} gather N{bn} K{bk} w{w} slab{slab}", gemv_sparse._sparse_gather_gemv_kernel,
                                     gsig, consts, w, s, div + ["w_ptr", "s_ptr", "t_ptr", "idx_ptr"],
                                     bn * bk * (1 if wdt == "i8" else 2)))
                        continue
                    fn = gemv_sparse._sparse_fma_gemv_kernel if kind == "fma" else gemv_sparse._sparse_dot_gemv_kernel
                    consts = dict(HAS_SCALE=wdt == "i8", BLOCK_T=1 if kind == "fma" else gemv_sparse.block_t(m), BLOCK_N=bn,
                                  BLOCK_K=bk, USE_WS=True, EVEN_K=True)
                    jobs.append((f"sparse {wdt} {kind} T{consts['BLOCK_T']} N{bn} K{bk} w{w} s{s}", fn, sig, consts, w, s,
                                 div + ["w_ptr", "s_ptr", "t_ptr"], bn * bk * (1 if wdt == "i8" else 2)))
    for name, fn, sig, consts, w, s, dv, nbytes in jobs:
        try:
            c = _compile(fn, sig, consts, w, s, dv, args.pdl)
        except Exception as e:  # noqa: BLE001
            print(f"{name:44s} COMPILE FAILED: {str(e).splitlines()[0][:200]}")
            continue
        out = report(name, c, w, nbytes)
        if args.dump and args.dump in name:
            print(out)


if __name__ == "__main__":
    main()
