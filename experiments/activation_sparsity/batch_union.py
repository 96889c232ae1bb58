"""How much of a weight a batch must read under activation sparsity: the union of its tokens' kept inputs.

A sparse GEMV skips the weight rows of the inputs a token zeroes. In a batch of B tokens a row can be
skipped only if every token zeroes that input, so the bytes read are the union of the tokens' kept inputs.
This measures that union on real text (the default model, held-out corpus, B different windows at the
same position) and on random weights of the same family (`synthetic:smollm2-135m`), for the calibrated
threshold rule at a target sparsity, weighted by each layer's weight size (the share of the weight
bytes a batch must read). 1 / union bounds the speed-up a sparse kernel can reach over the dense GEMM.

    python experiments/activation_sparsity/batch_union.py [--target 0.5] [--out batch_union.json]

Masks come from the dense model's inputs and the dense calibration's thresholds (what `thresholdNN`
applies at the first layer; deeper layers see slightly different inputs under the policy). 2 CPU cores:
about 2 minutes per model.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from workbench import Engine
from workbench.corpus import load_text, token_windows
from workbench.roles import linear_modules
from workbench.sparsity.calibrate import cached_calibration
from workbench.sparsity.calibration import calibration_targets, input_hooks

BATCHES = (1, 2, 4, 8, 16, 32, 64)


def kept_masks(engine, target: float, windows: int, positions: int, seq_len: int) -> dict[str, torch.Tensor]:
    """fqn -> bool (positions, windows, in_features): which inputs each window keeps at each position."""
    cal = cached_calibration(engine)
    text, _ = load_text(None, "heldout")
    ids = token_windows(engine.tokenizer, text, seq_len, max_tokens=windows * seq_len)
    ids = torch.stack([w for w in ids if len(w) == seq_len][:windows])
    if len(ids) < windows:
        raise SystemExit(f"the held-out text gives only {len(ids)} windows of {seq_len} tokens")
    masks: dict[str, torch.Tensor] = {}

    def record(fqn, module, x):
        thr = cal.for_module(fqn).threshold(target)
        masks[fqn] = (x[:, -positions:].float().abs() > thr).transpose(0, 1).cpu()

    with torch.inference_mode(), input_hooks(calibration_targets(engine.model), record):
        engine.model(ids.to(engine.device))
    return masks


def union_fractions(masks: dict[str, torch.Tensor], sizes: dict[str, int]) -> dict[int, dict]:
    """Batch size -> the weight-size-weighted share of inputs some token of the batch keeps (overall and
    per role), averaged over positions and over disjoint groups of windows."""
    out = {}
    for b in BATCHES:
        per_role: dict[str, list[float]] = {}
        total, weight = 0.0, 0
        for fqn, m in masks.items():
            p, w, d = m.shape
            groups = m[:, : (w // b) * b].reshape(p, w // b, b, d)
            frac = groups.any(dim=2).float().mean().item()
            role = fqn.rsplit(".", 1)[-1].replace("_proj", "")
            per_role.setdefault(role, []).append(frac)
            total += frac * sizes[fqn]
            weight += sizes[fqn]
        out[b] = {"union": total / weight, "by_role": {r: sum(v) / len(v) for r, v in per_role.items()}}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--models", default="default,synthetic:smollm2-135m")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--positions", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", default=str(Path(__file__).with_name("batch_union.json")))
    args = ap.parse_args()
    result = {"target": args.target, "windows": args.windows, "positions": args.positions, "seq_len": args.seq_len,
              "command": "python experiments/activation_sparsity/batch_union.py", "models": {}}
    for name in args.models.split(","):
        engine = Engine.from_pretrained(name)
        sizes = {fqn: m.weight.numel() for fqn, m, _ in linear_modules(engine.model) if hasattr(m, "weight")}
        masks = kept_masks(engine, args.target, args.windows, args.positions, args.seq_len)
        fr = union_fractions(masks, sizes)
        result["models"][name] = {str(b): v for b, v in fr.items()}
        print(f"{name}: kept share of the weight bytes a batch must read, threshold rule at {args.target:.2f}")
        for b, v in fr.items():
            roles = "  ".join(f"{r} {f:.3f}" for r, f in sorted(v["by_role"].items()))
            print(f"  batch {b:>2}: {v['union']:.3f}  (bound on the sparse speed-up {1 / v['union']:.2f}x)   {roles}")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
