"""Achieved activation sparsity against its target under the calibrated threshold rule: thresholds from
the dense model (round 0) against thresholds calibrated under the policy itself (`calibrate_under`,
rounds 1..R), on held-out text of the default corpus and on a text of another kind (the GPL-3 licence).

    python experiments/activation_sparsity/drift.py [--targets 0.4,0.5] [--rounds 2] [--out drift.json]

Default model, 4096 held-out tokens per evaluation, 16384 calibration tokens per round (2 CPU cores: about
6 minutes per target).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from workbench import Engine, Policy
from workbench.evaluate import evaluate
from workbench.sparsity.calibrate import cached_calibration, calibrate

OTHER_TEXT = Path("/usr/share/common-licenses/GPL-3")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="0.4,0.5")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", default=str(Path(__file__).with_name("drift.json")))
    args = ap.parse_args()
    engine = Engine.from_pretrained(args.model)
    dense = cached_calibration(engine)
    rows = []
    for target in (float(t) for t in args.targets.split(",")):
        policy = Policy.parse(f"threshold{round(100 * target)}")
        cal = dense
        for r in range(args.rounds + 1):
            if r:
                engine.reconfigure(policy, calibration=cal)  # the previous round's thresholds upstream
                cal = calibrate(engine, under=policy)
            engine.reconfigure(policy, calibration=cal)
            texts = [None] + ([str(OTHER_TEXT)] if OTHER_TEXT.is_file() and r in (0, args.rounds) else [])
            for corpus in texts:
                res = evaluate(engine, corpus=corpus, progress=False)
                a = res["achieved_sparsity"]
                row = dict(target=target, rounds=r, text="held-out" if corpus is None else OTHER_TEXT.name,
                           achieved=a["overall"], drift=a["overall"] - target, by_role=a.get("by_role"),
                           kld=res["kld_mean"], top1=res["top1"], perplexity=res["perplexity"])
                rows.append(row)
                print(f"target {target:.2f} round {r} {row['text']:>8}: achieved {row['achieved']:.4f} "
                      f"(drift {row['drift']:+.4f}), KLD {row['kld']:.4f}, top-1 {row['top1']:.3f}", flush=True)
                Path(args.out).write_text(json.dumps(dict(model=args.model, rows=rows), indent=1))
    engine.calibration = dense


if __name__ == "__main__":
    main()
