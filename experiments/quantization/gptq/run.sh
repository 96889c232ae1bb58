#!/usr/bin/env bash
# GPTQ, importance-weighted rounding (imatrix) and activation-aware scales (awq) against round-to-nearest on the default model (2 CPU
# cores: the calibration Hessians from 8192 tokens of the corpus's calibration split are collected once,
# ~40 s, and cached; each eval then takes 1-3 minutes).
#   bash experiments/quantization/gptq/run.sh [OUT_DIR] [PRECISION ...]    # default: every row below
set -euo pipefail
cd "$(dirname "$0")/../../.."
out="${1:-experiments/quantization/gptq}"
shift || true
precisions=("$@")
[ ${#precisions[@]} -gt 0 ] || precisions=(int4-g32 int4-g64 int4-g128 int3-g64 int2-g64 int2-g64-asym)
for precision in "${precisions[@]}"; do
    python -m workbench.cli eval --precision "$precision" --json > "$out/eval_$precision.json"
    python -m workbench.cli eval --precision "$precision" --quant-method gptq --json > "$out/eval_$precision-gptq.json"
    python -m workbench.cli eval --precision "$precision" --quant-method imatrix --json > "$out/eval_$precision-imatrix.json"
    [ "$precision" = int2-g64-asym ] || \
        python -m workbench.cli eval --precision "$precision" --quant-method awq --json > "$out/eval_$precision-awq.json"
done
python - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]


def bpw(e):  # bits per weight of the quantized block linears as packed (layers that fell back included)
    packed = sum(v for k, v in e["weight_bytes_by_format"].items() if k not in ("float32", "bfloat16", "float16"))
    return 8 * packed / (e["reference_bytes"] / 4)


print("| precision | bits/weight | rtn KLD / top-1 / ppl | gptq KLD / top-1 / ppl | imatrix KLD / top-1 / ppl | "
      "awq KLD / top-1 / ppl | KLD rtn / best |\n|---|---|---|---|---|---|---|")
for p in ("int4-g32", "int4-g64", "int4-g128", "int3-g64", "int2-g64", "int2-g64-asym"):
    if not os.path.exists(f"{out}/eval_{p}-gptq.json"):
        continue
    r, g, i, a = (json.load(open(f"{out}/eval_{p}{s}.json")) if os.path.exists(f"{out}/eval_{p}{s}.json") else None
                  for s in ("", "-gptq", "-imatrix", "-awq"))
    cell = lambda e: "-" if e is None else f"{e['kld_mean']:.4f} / {e['top1']:.3f} / {e['perplexity']:.2f}"  # noqa: E731
    best = min(e["kld_mean"] for e in (g, i, a) if e is not None)
    print(f"| {p} | {bpw(r):.2f} | {cell(r)} | {cell(g)} | {cell(i)} | {cell(a)} | {r['kld_mean'] / best:.2f}x |")
PY

# Overfitting check: the same calibration (the default corpus), evaluated on a text of another kind
# (the GPL-3 licence from Debian's common-licenses; skipped where the file is absent).
gpl=/usr/share/common-licenses/GPL-3
if [ -f "$gpl" ]; then
    for precision in int4-g64 int3-g64; do
        for method in rtn gptq imatrix awq; do
            python -m workbench.cli eval --precision "$precision" --quant-method "$method" --corpus "$gpl" --json \
                > "$out/gpl3_$precision-$method.json"
        done
    done
    python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
print("\n| on GPL-3 | rtn KLD / top-1 / ppl | gptq KLD / top-1 / ppl | imatrix KLD / top-1 / ppl | awq KLD / top-1 / ppl |"
      "\n|---|---|---|---|---|")
for p in ("int4-g64", "int3-g64"):
    cells = []
    for m in ("rtn", "gptq", "imatrix", "awq"):
        e = json.load(open(f"{out}/gpl3_{p}-{m}.json"))
        cells.append(f"{e['kld_mean']:.4f} / {e['top1']:.3f} / {e['perplexity']:.2f}")
    print(f"| {p} | " + " | ".join(cells) + " |")
PY
fi

# auto at int4-g64's size, choosing per module among calibrated formats (a 20-minute scan on 2 cores)
python -m workbench.cli eval --precision auto --budget-bits 4.25 \
    --auto-formats int3-g64-gptq,int4-g128-gptq,int4-g64-gptq,int4-g32-gptq,int8 --json > "$out/eval_auto-4.25bpw-gptq.json"
