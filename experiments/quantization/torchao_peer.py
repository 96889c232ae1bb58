"""Our int8/int4 weight-only formats against torchao's on the same model and text (a peer check).

    pip install torchao   # optional; not a workbench dependency
    python experiments/quantization/torchao_peer.py [--max-tokens 1024]

torchao quantizes a copy of the unmodified model with `quantize_(model, Int8WeightOnlyConfig())` (and
Int4WeightOnlyConfig where it runs); we score both against the same reference logits: KLD, top-1, and the
median CPU forward time over 128 tokens. Writes torchao_peer.json.
"""
import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from workbench import Engine, Policy
from workbench.corpus import corpus_split, token_windows
from workbench.environment import environment
from workbench.evaluate import compare_logits

HERE = Path(__file__).resolve().parent


def score(model_fn, ids, reference):
    with torch.inference_mode():
        logits = model_fn(ids)
        m = compare_logits(reference[0, :-1], logits[0, :-1].float(), ids[0, 1:])
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            model_fn(ids[:, :128])
            times.append((time.perf_counter() - t0) * 1e3)
    return {"kld_mean": m["kld"].mean().item(), "top1": m["same_top1"].mean().item(),
            "forward_128_ms": statistics.median(times)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=1024)
    args = ap.parse_args()
    engine = Engine.from_pretrained("default", device="cpu")
    ids = token_windows(engine.tokenizer, corpus_split("heldout"), args.max_tokens, args.max_tokens)[0][None]
    reference = engine.reference_logits(ids)
    rows = {"dense": score(engine.forward, ids, reference)}
    for label in ("int8", "int4-g64"):
        engine.reconfigure(Policy.uniform(precision=label))
        rows[f"workbench {label}"] = score(engine.forward, ids, reference)
    engine.unwrap()
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        rows["torchao"] = {"error": f"torchao not importable: {e}"}
    else:
        for name, config in (("torchao int8", Int8WeightOnlyConfig()), ("torchao int4-g64", Int4WeightOnlyConfig(group_size=64))):
            model = copy.deepcopy(engine.model)
            try:
                quantize_(model, config)
                rows[name] = score(lambda x: model(input_ids=x, use_cache=False).logits, ids, reference)
            except Exception as e:  # report what the peer cannot do here, in one line
                rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    out = {"rows": rows, "tokens": int(ids.shape[1]), **environment()}
    (HERE / "torchao_peer.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
