"""A peer in the same run: HQQ (the `hqq` package's half-quadratic quantizer, calibration-free) against our
round-to-nearest and GPTQ at equal bits per weight, on the default model's block linears.

    PYTHONPATH=/path/to/hqq python experiments/quantization/gptq/peer_hqq.py [--out peer_hqq.json]

HQQ is installed from PyPI (`pip install hqq`, or its source folder on PYTHONPATH with `termcolor` and
`einops`). Each HQQ weight is quantized on the CPU (`Quantizer.quantize(..., optimize=True)`, its
defaults) and dequantized back into a copy of the model, so every row is scored the same way: KL divergence
of next-token distributions against the unmodified model, top-1 agreement and perplexity, over the same
held-out windows (4096 tokens of the default corpus). Bits per weight as stored: HQQ keeps a scale and a
zero per group (16 bits each), like our asymmetric groups; our symmetric groups keep one scale.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch

from workbench import Engine, Policy
from workbench.corpus import load_text, token_windows
from workbench.environment import environment
from workbench.evaluate import compare_logits
from workbench.policy import BLOCK_ROLES
from workbench.progress import progress as bar
from workbench.roles import linear_modules

# (label, bits per weight, how): ours by policy name, HQQ by (nbits, group)
ROWS = [
    ("ours int4-g64 rtn", 4.25, "int4-g64"), ("ours int4-g64 gptq", 4.25, "int4-g64-gptq"),
    ("hqq 4-bit g128", 4.25, (4, 128)),
    ("ours int4-g64-asym rtn", 4.5, "int4-g64-asym"), ("ours int4-g64-asym gptq", 4.5, "int4-g64-asym-gptq"),
    ("ours int4-g32 gptq", 4.5, "int4-g32-gptq"), ("hqq 4-bit g64", 4.5, (4, 64)),
    ("ours int3-g64-asym rtn", 3.5, "int3-g64-asym"), ("ours int3-g64-asym gptq", 3.5, "int3-g64-asym-gptq"),
    ("hqq 3-bit g64", 3.5, (3, 64)),
]


def hqq_model(model, nbits: int, group: int):
    """A copy of `model` whose block linears hold HQQ's dequantized weights."""
    from hqq.core.quantize import Quantizer
    out = copy.deepcopy(model)
    for fqn, module, role in bar(list(linear_modules(out)), desc=f"hqq {nbits}-bit g{group}", unit="layer"):
        if role not in BLOCK_ROLES:
            continue
        w = module.weight.data
        q, meta = Quantizer.quantize(w.float(), nbits=nbits, group_size=group, optimize=True, axis=1, device="cpu",
                                     compute_dtype=torch.float32)
        module.weight.data = Quantizer.dequantize(q, meta).reshape(w.shape).to(w.dtype)
    return out


def score(ref_logits: list[torch.Tensor], forward, windows) -> dict:
    parts: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode():
        for ref, window in zip(ref_logits, windows):
            mod = forward(window[None])[0, :-1]
            for key, value in compare_logits(ref, mod, window[1:]).items():
                parts.setdefault(key, []).append(value)
    m = {k: torch.cat(v).double() for k, v in parts.items()}
    return {"kld_mean": m["kld"].mean().item(), "top1": m["same_top1"].mean().item(),
            "perplexity": math.exp(m["nll"].mean().item()), "tokens": int(m["kld"].numel())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).with_name("peer_hqq.json")))
    ap.add_argument("--max-tokens", type=int, default=4096)
    args = ap.parse_args()
    import hqq  # fails here, before any work, when the peer is not installed
    engine = Engine.from_pretrained("default")
    text, source = load_text(None, "heldout")
    windows = token_windows(engine.tokenizer, text, min(512, engine.max_positions), args.max_tokens)
    with torch.inference_mode():
        ref_logits = [engine.forward(w[None])[0, :-1] for w in windows]
    rows = []
    for label, bits, how in ROWS:
        if isinstance(how, tuple):
            model = hqq_model(engine.model, *how)
            row = score(ref_logits, lambda ids: model(ids).logits, windows)
            del model
        else:
            engine.reconfigure(Policy.uniform(precision=how))
            row = score(ref_logits, engine.forward, windows)
            engine.reconfigure(Policy.identity())
        rows.append({"method": label, "bits_per_weight": bits, **row})
        print(f"{label:>26}  {bits:.2f} bits  KLD {row['kld_mean']:.4f}  top-1 {row['top1']:.3f}  "
              f"ppl {row['perplexity']:.2f}", flush=True)
    Path(args.out).write_text(json.dumps({"model": engine.name, "corpus": source, "hqq": hqq.__version__
                                          if hasattr(hqq, "__version__") else "0.2.8.post1", "rows": rows,
                                          **environment()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
