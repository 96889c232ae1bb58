"""How much calibration text GPTQ needs: held-out output error of GPTQ against round-to-nearest on three
layers of the default model, for Hessians from 2048, 8192 and 16384 calibration tokens, with and without
column reordering by activation (act order).

    python experiments/quantization/gptq/calibration_tokens.py [--out experiments/quantization/gptq/calibration_tokens.json]

Output error: mean of (x (W - Wq)^T)^2 over the layer's inputs on 1024 held-out tokens (256-token windows).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from workbench import Engine
from workbench.corpus import load_text, token_windows
from workbench.formats.gptq import gptq_quantize
from workbench.formats.hessians import collect_hessians
from workbench.formats.quant import dequantize_int4, quantize_int4
from workbench.policy import Weights
from workbench.sparsity.calibration import input_hooks

LAYERS = ("model.layers.6.mlp.down_proj", "model.layers.6.self_attn.q_proj", "model.layers.20.mlp.gate_proj")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="experiments/quantization/gptq/calibration_tokens.json")
    args = ap.parse_args()
    engine = Engine.from_pretrained("default")
    held = {f: [] for f in LAYERS}
    text, _ = load_text(None, "heldout")
    targets = [(f, engine.model.get_submodule(f)) for f in LAYERS]
    with input_hooks(targets, lambda f, m, x: held[f].append(x.reshape(-1, x.shape[-1]).float())):
        for window in token_windows(engine.tokenizer, text, 256, 1024):
            engine.forward(window[None])
    spec, rows = Weights("int4", 64), []
    for tokens in (2048, 8192, 16384):
        t0 = time.perf_counter()
        # a token count below GPTQ's own floor is what this measures: collect with the floor lowered
        import workbench.formats.hessians as hessians
        floor, hessians.MIN_TOKENS_PER_INPUT = hessians.MIN_TOKENS_PER_INPUT, 0
        try:
            hs = collect_hessians(engine, LAYERS, tokens=tokens, progress=False)
        finally:
            hessians.MIN_TOKENS_PER_INPUT = floor
        seconds = time.perf_counter() - t0
        for f in LAYERS:
            x, w = torch.cat(held[f]), engine.model.get_submodule(f).weight.float()
            err = lambda wq: (x @ (w - wq).T).pow(2).mean().item()  # noqa: E731
            rtn = err(dequantize_int4(quantize_int4(w, 64)))
            for act_order in (True, False):
                g = err(dequantize_int4(gptq_quantize(w, hs[f][0], spec, act_order=act_order)))
                rows.append({"tokens": tokens, "layer": f, "act_order": act_order, "gptq_over_rtn": g / rtn,
                             "collect_s": round(seconds, 1)})
                print(f"{tokens:6d} {f:34s} act_order={act_order!s:5} gptq/rtn {g / rtn:.3f}", flush=True)
    with open(args.out, "w") as fh:
        json.dump({"format": spec.label, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
