#!/usr/bin/env bash
# Reproduces this folder's GPU results (a CUDA machine with Triton; gemlite is an optional peer):
#   bash experiments/speed/run.sh [h200|h100] [OUT_DIR]      # default: h200 into experiments/speed
# The H200 run: the decode matrix of issue "compression that pays" (ratios to dense in one run), then the
# per-kernel profile of a decode step. Tuned launch configs persist in WORKBENCH_TUNING_CACHE (default
# .cache/tuning_<gpu>.json, not committed), so a run cut short resumes without timing everything again.
set -euo pipefail
cd "$(dirname "$0")/../.."
which="${1:-h200}"
out="${2:-experiments/speed}"
bench=(python -m workbench.cli bench --model synthetic:llama-3-8b --no-transformers)
case "$which" in
  h200)
    export WORKBENCH_TUNING_CACHE="${WORKBENCH_TUNING_CACHE:-.cache/tuning_h200.json}"
    "${bench[@]}" --batch 1,8,32,64 --policies dense,int8,int4-g64,threshold50,threshold50+int8 \
        --new-tokens 16 --out "$out/bench_llama-3-8b_h200.json" | tee "$out/bench_llama-3-8b_h200.log"
    "${bench[@]}" --batch 1,8 --policies dense,int8,int4-g64,threshold50,threshold50+int8 --new-tokens 8 \
        --profile --out "$out/profile_llama-3-8b_h200.json"
    ;;
  h100)
    python -m workbench.cli bench --model synthetic:llama-3-8b --batch 1,8 \
        --policies dense,int8,int4-g64,topk25,topk40,topk50,topk50+int8,threshold50,threshold50+int8 \
        --out "$out/bench_llama-3-8b_h100.json"
    python -m workbench.cli bench --model synthetic:smollm2-135m --batch 1,8 --out "$out/bench_smollm2-135m_h100.json"
    python experiments/speed/gemv.py --out "$out/gemv_h100.json"
    ;;
  *) echo "usage: bash experiments/speed/run.sh [h200|h100] [OUT_DIR]" >&2; exit 2 ;;
esac
