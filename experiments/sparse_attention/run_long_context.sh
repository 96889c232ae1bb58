#!/usr/bin/env bash
# Long-context decode on a CUDA machine (the long-context issue's numbers; not run yet on this tree):
#   bash experiments/sparse_attention/run_long_context.sh [OUT_DIR]
# Llama-3-8B's shapes with 128k positions (synthetic:llama-3.1-8b), dense against the selectors at 2048 keys,
# each ratio against dense at the same context and batch in the same run; the profile gives attention's share.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-experiments/sparse_attention}"
bench=(python -m workbench.cli bench --model synthetic:llama-3.1-8b --no-transformers --new-tokens 16)
"${bench[@]}" --context 8k,32k --batch 1,8 --policies dense,topk:2048,indexer:2048,block:2048 \
    --out "$out/long_context_h200.json"
"${bench[@]}" --context 128k --batch 1 --policies dense,topk:2048,indexer:2048 --profile \
    --out "$out/long_context_128k_h200.json"
