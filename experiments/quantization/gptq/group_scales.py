"""Static group scales with act order (the default) against scales found during the sweep (no reordering),
on the default model's block linears at int4-g64 and int4-g128: KLD / top-1 / perplexity on held-out text.

    python experiments/quantization/gptq/group_scales.py [--out experiments/quantization/gptq/group_scales.json]
"""
from __future__ import annotations

import argparse
import functools
import json

import workbench.formats.gptq as gptq
from workbench import Engine, Policy
from workbench.evaluate import evaluate

MODES = {"act order, static scales": dict(act_order=True, static_groups=True),
         "stored order, scales in the sweep": dict(act_order=False, static_groups=False)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="experiments/quantization/gptq/group_scales.json")
    args = ap.parse_args()
    engine = Engine.from_pretrained("default")
    original = gptq.gptq_quantize
    rows = []
    for precision in ("int4-g64-gptq", "int4-g128-gptq"):
        for mode, options in MODES.items():
            gptq.gptq_quantize = functools.partial(original, **options)  # what the gptq method calls
            engine.unwrap()  # the same policy again would keep its wrappers, and the packed-weight cache
            engine.store_cache.clear()  # keys on the format, not on these options
            try:
                engine.reconfigure(Policy.uniform(precision=precision))  # block linears, as `eval --precision`
                r = evaluate(engine, progress=False)
            finally:
                gptq.gptq_quantize = original
            rows.append({"precision": precision, "mode": mode, "kld_mean": r["kld_mean"], "top1": r["top1"],
                         "perplexity": r["perplexity"]})
            print(f"{precision:15s} {mode:36s} KLD {r['kld_mean']:.4f} top-1 {r['top1']:.3f} ppl {r['perplexity']:.2f}",
                  flush=True)
    with open(args.out, "w") as fh:
        json.dump({"rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
