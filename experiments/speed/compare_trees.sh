#!/usr/bin/env bash
# The same `workbench bench` matrix with two copies of the package, back to back on one GPU: a refactor
# must leave decode speed where it was.
#   bash experiments/speed/compare_trees.sh OLD_PACKAGE_PARENT OUT_DIR [bench args...]
# OLD_PACKAGE_PARENT holds an older `workbench/` (e.g. `git archive REV workbench | tar -x -C DIR`).
set -euo pipefail
cd "$(dirname "$0")/../.."
old="$1"; out="$2"; shift 2
args=(--model synthetic:llama-3-8b --no-transformers "$@")
mkdir -p "$out"
PYTHONPATH="$old" python3 -m workbench.cli bench "${args[@]}" --out "$out/bench_before.json"
python3 -m workbench.cli bench "${args[@]}" --out "$out/bench_after.json"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
before, after = (json.load(open(f"{out}/bench_{k}.json")) for k in ("before", "after"))
rows = {(r["policy"], r["batch"]): r["ms_per_step"] for r in before["rows"]}
print(f"{'policy':>18} {'batch':>5} {'before ms':>10} {'after ms':>9} {'after/before':>12}")
for r in after["rows"]:
    b = rows.get((r["policy"], r["batch"]))
    print(f"{r['policy']:>18} {r['batch']:>5} {b:10.3f} {r['ms_per_step']:9.3f} {r['ms_per_step'] / b:12.3f}")
PY
