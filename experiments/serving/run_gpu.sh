#!/usr/bin/env bash
# Reproduces the GPU serving results of this folder (a CUDA machine with Triton; random weights of
# Llama-3-8B's shapes, bf16):   bash experiments/serving/run_gpu.sh [OUT_DIR] [NAME_SUFFIX]
#   serving_h200.json: one-at-a-time, continuous, transformers' generate_batch, Poisson sweep, and the
#                      elastic controller on the default sparsity ladder under 2x overload
#   serving_h200_precision_ladder.json: the same overload with the ladder dense -> int8 -> int4-g64
#   serving_h200_faster_rung_seed{0,1,2}.json: the same overload with the ladder dense -> threshold50+int8,
#                      the one rung faster than dense at 32 slots (`experiments/speed`), three workloads
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-experiments/serving}"
suffix="${2:-}"
common=(--model synthetic:llama-3-8b --requests 64 --prompt-tokens 128 --output-tokens 64 --max-num-seqs 32
        --slo-ttft 1.0 --slo-tpot 0.05)
python -m workbench.cli loadtest "${common[@]}" --rates 4,8,16 --out "$out/serving_h200$suffix.json"
python -m workbench.cli loadtest "${common[@]}" --modes continuous,elastic --ladder dense,int8,int4-g64 \
    --out "$out/serving_h200_precision_ladder$suffix.json"
for seed in 0 1 2; do
    python -m workbench.cli loadtest "${common[@]}" --modes continuous,elastic --ladder dense,threshold50+int8 \
        --seed "$seed" --out "$out/serving_h200_faster_rung_seed$seed$suffix.json"
done
