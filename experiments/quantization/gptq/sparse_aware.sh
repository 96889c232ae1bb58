#!/usr/bin/env bash
# Calibrating on the inputs a layer gets as the policy runs: GPTQ and imatrix on layers that are also
# sparsified, with the Hessian of their sparsified inputs (--calibrate-sparse, suffix -sparsecal; the model
# run under the policy's sparsity) against the unmodified model's dense inputs (the default), under
# threshold40 + int4-g64 on the default model; rtn and the sparsity alone beside them. Held-out text, and
# the GPL-3 text for the overfitting check. 2 CPU cores: ~20 min.
#   bash experiments/quantization/gptq/sparse_aware.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/../../.."
out="${1:-experiments/quantization/gptq}"
policy=(--sparsity 0.4 --sparsity-rule threshold --precision int4-g64)
ev() { python -m workbench.cli eval "$@" --json; }
ev --sparsity 0.4 --sparsity-rule threshold > "$out/sa_threshold40.json"
ev "${policy[@]}" > "$out/sa_threshold40+int4-g64-rtn.json"
for method in gptq imatrix; do
    ev "${policy[@]}" --quant-method "$method" > "$out/sa_threshold40+int4-g64-$method.json"
    ev "${policy[@]}" --quant-method "$method" --calibrate-sparse > "$out/sa_threshold40+int4-g64-$method-sparsecal.json"
done
gpl=/usr/share/common-licenses/GPL-3
if [ -f "$gpl" ]; then
    ev "${policy[@]}" --quant-method gptq --corpus "$gpl" > "$out/sa_gpl3_threshold40+int4-g64-gptq.json"
    ev "${policy[@]}" --quant-method gptq --calibrate-sparse --corpus "$gpl" > "$out/sa_gpl3_threshold40+int4-g64-gptq-sparsecal.json"
fi
python - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
print("| policy | held-out KLD / top-1 / ppl | GPL-3 KLD / top-1 / ppl |\n|---|---|---|")
for name in ("threshold40", "threshold40+int4-g64-rtn", "threshold40+int4-g64-gptq", "threshold40+int4-g64-gptq-sparsecal",
             "threshold40+int4-g64-imatrix", "threshold40+int4-g64-imatrix-sparsecal"):
    cells = []
    for prefix in ("sa_", "sa_gpl3_"):
        path = f"{out}/{prefix}{name}.json"
        e = json.load(open(path)) if os.path.exists(path) else None
        cells.append("-" if e is None else f"{e['kld_mean']:.4f} / {e['top1']:.3f} / {e['perplexity']:.2f}")
    print(f"| {name} | {cells[0]} | {cells[1]} |")
PY
