#!/usr/bin/env bash
# Reproduces the H100 results of this folder (needs a CUDA machine with Triton):
#   bash experiments/speed/run.sh [OUT_DIR]        # default: experiments/speed
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-experiments/speed}"
python -m workbench.cli bench --model synthetic:llama-3-8b --batch 1,8 \
    --policies dense,int8,int4-g64,topk25,topk40,topk50,topk50+int8,threshold50,threshold50+int8 \
    --out "$out/bench_llama-3-8b_h100.json"
python -m workbench.cli bench --model synthetic:smollm2-135m --batch 1,8 --out "$out/bench_smollm2-135m_h100.json"
python experiments/speed/gemv.py --out "$out/gemv_h100.json"
