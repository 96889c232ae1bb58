#!/usr/bin/env bash
# GPTQ against round-to-nearest on the default model (2 CPU cores: about 2 minutes per GPTQ row, most of
# it collecting the calibration Hessians from 8192 tokens of the corpus's calibration split).
#   bash experiments/quantization/gptq/run.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/../../.."
out="${1:-experiments/quantization/gptq}"
for precision in int4-g32 int4-g64 int4-g128; do
    python -m workbench.cli eval --precision "$precision" --json > "$out/eval_$precision.json"
    python -m workbench.cli eval --precision "$precision" --quant-method gptq --json > "$out/eval_$precision-gptq.json"
done
python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
print("| precision | rtn KLD / top-1 / ppl | gptq KLD / top-1 / ppl | KLD rtn / gptq |\n|---|---|---|---|")
for p in ("int4-g32", "int4-g64", "int4-g128"):
    r, g = (json.load(open(f"{out}/eval_{p}{s}.json")) for s in ("", "-gptq"))
    print(f"| {p} | {r['kld_mean']:.4f} / {r['top1']:.3f} / {r['perplexity']:.2f} | "
          f"{g['kld_mean']:.4f} / {g['top1']:.3f} / {g['perplexity']:.2f} | {r['kld_mean'] / g['kld_mean']:.2f}x |")
PY
