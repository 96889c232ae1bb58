"""Markdown tables from a bench_gemv.py results file: per family, shape and M, ours against cuBLAS bf16, and
the fastest variant that passed the 1e-2 check (peers failing it are listed apart).

    python experiments/speed/kernels/summarize.py experiments/speed/kernels/results_v2.json
"""
import json
import sys
from collections import defaultdict

TOL = 1e-2


def main(path):
    d = json.load(open(path))
    rows = d["rows"]
    by = defaultdict(list)
    for r in rows:
        by[(r["family"], r["shape"], r["m"])].append(r)
    print(f"env: {d['env']}\n")
    for fam, ours in (("int8", "ours int8"), ("int4", "ours int4-g64"), ("sparse", "ours sparse bf16"),
                      ("sparse", "ours sparse int8")):
        print(f"### {ours}\n")
        print("| shape | M | ours us | cuBLAS us | speedup | GB/s | fastest passing the check | failing peers |")
        print("|---|---|---|---|---|---|---|---|")
        for r in [r for r in rows if r["variant"] == ours]:
            cell = by[(fam, r["shape"], r["m"])] + [x for x in by[("dense", r["shape"], r["m"])]]
            ok = [x for x in cell if x["rel_err"] is None or x["rel_err"] < TOL]
            if fam == "sparse":  # compare like with like: bf16 sparse vs bf16 paths, int8 vs int8 paths
                kind = "int8" if "int8" in ours else "bf16"
                ok = [x for x in ok if kind in x["variant"]]
            best = min(ok, key=lambda x: x["us"])
            bad = [f"{x['variant']} {x['us']:.1f} (err {x['rel_err']:.1e})" for x in cell
                   if x["rel_err"] is not None and x["rel_err"] >= TOL]
            extra = ""
            if fam == "sparse":
                extra = f" (kept {r['kept_frac']:.2f}; mask+cuBLAS {r['mask_cublas_us']:.1f})"
            print(f"| {r['shape']} | {r['m']} | {r['us']:.1f} | {r['cublas_us']:.1f} | {r['cublas_us'] / r['us']:.2f} | "
                  f"{r['gb_per_s']:.0f} | {best['variant']} {best['us']:.1f}{extra} | {'; '.join(bad)} |")
        print()


if __name__ == "__main__":
    main(sys.argv[1])
