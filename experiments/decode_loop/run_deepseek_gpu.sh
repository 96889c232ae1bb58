#!/usr/bin/env bash
# DeepSeek-V2-Lite's shapes in the engine's decode loop on a CUDA machine (not run yet on this tree):
#   bash experiments/decode_loop/run_deepseek_gpu.sh [OUT_DIR]
# Latent attention over the latent cache, routed experts (eager steps: no CUDA graph), the roofline counting
# the active experts a batch reaches and the latent cache; transformers' eager generate in the same run.
# Weight formats cover the linear layers (attention, shared experts, the dense first layer), not yet the
# routed experts.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-experiments/decode_loop}"
python -m workbench.cli bench --model synthetic:deepseek-v2-lite --batch 1,8,32 --policies dense,int8,int4-g64 \
    --new-tokens 16 --out "$out/bench_deepseek-v2-lite_h200.json"
