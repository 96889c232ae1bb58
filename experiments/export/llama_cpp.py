"""The exported GGUF in a real serving engine: llama.cpp (through llama-cpp-python) against the workbench.

    python3 -m venv LLAMA_VENV && LLAMA_VENV/bin/pip install llama-cpp-python numpy   # builds llama.cpp
    python experiments/export/llama_cpp.py --llama-python LLAMA_VENV/bin/python --out experiments/export/llama_cpp.json

For each policy (uniform int4-g32; int4-g32 with down_proj in int8-g32; with --auto, `auto` at 5.5 bits per
weight choosing per module between int4-g32 and int8-g32, both held exactly by GGUF), the default model is
exported, llama.cpp evaluates the same held-out token windows (its own CPU kernels: Q4_0 / Q4_1
dot products against activations it quantizes to 8 bits, F32 elsewhere) and the next-token distributions
are compared with the workbench's policy model and with the unmodified model: KLD and top-1 agreement.
llama.cpp runs in its own virtualenv (a subprocess), so this project does not depend on it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# Runs inside llama-cpp-python's interpreter: token windows in, float32 logits of every position out.
LLAMA_EVAL = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
path, windows_file, out_file = sys.argv[1:4]
windows = json.load(open(windows_file))
llm = Llama(model_path=path, n_ctx=max(len(w) for w in windows), logits_all=True, verbose=False, n_threads=2)
out = []
for w in windows:
    llm.reset()
    llm.eval(w)
    out.append(np.array(llm.scores[:len(w)], dtype=np.float32))  # a copy: the next eval reuses the buffer
np.save(out_file, np.concatenate(out))
"""


def policies(auto: bool):
    import dataclasses

    from workbench import Engine, Policy
    from workbench.policy import Rule, Setting, parse_precision
    engine = Engine.from_pretrained("default", device="cpu")
    # the default model's own weights (it ships as Q4_1, which int4-g32-asym reproduces exactly): what is
    # left between llama.cpp and the workbench here is llama.cpp's arithmetic, not the export
    yield "int4-g32-asym (the unmodified weights)", engine, Policy.uniform(precision="int4-g32-asym")
    yield "int4-g32", engine, Policy.uniform(precision="int4-g32")
    mixed = dataclasses.replace(Policy.uniform(precision="int4-g32"), name="int4-g32, down_proj int8-g32",
                                rules=(Rule("role:down", Setting(weights=parse_precision("int8-g32"))),))
    yield "int4-g32, down_proj int8-g32", engine, mixed
    if auto:  # a 20-minute sensitivity scan on 2 cores the first time (then cached)
        from workbench.formats.mixed_precision import with_auto_precision
        from workbench.formats.sensitivity import cached_scan
        scan = cached_scan(engine, ("int4-g32", "int8-g32"), progress=True)
        yield "auto-5.5bpw (int4-g32 | int8-g32)", engine, with_auto_precision(Policy.identity(), scan,
                                                                             budget_bits=5.5)


def compare(ref: torch.Tensor, mod: torch.Tensor) -> dict:
    from workbench.evaluate import compare_logits
    targets = torch.zeros(ref.shape[0], dtype=torch.long)  # NLLs are not reported here
    m = compare_logits(ref, mod, targets)
    return {"kld_mean": m["kld"].mean().item(), "top1": m["same_top1"].mean().item()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-python", required=True, help="python of a virtualenv with llama-cpp-python")
    ap.add_argument("--tokens", type=int, default=1024, help="held-out tokens scored")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default=str(Path(__file__).with_name("llama_cpp.json")))
    ap.add_argument("--auto", action="store_true", help="also an `auto` mixture (needs a sensitivity scan)")
    args = ap.parse_args()
    from workbench.corpus import load_text, token_windows
    from workbench.export.gguf import export_gguf
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, engine, policy in policies(args.auto):
            engine.reconfigure(policy)
            text, corpus = load_text(None, "heldout")
            windows = token_windows(engine.tokenizer, text, args.seq_len, args.tokens)
            path = Path(tmp) / "model.gguf"
            report = export_gguf(engine, path, force=True, progress=False)
            (Path(tmp) / "windows.json").write_text(json.dumps([w.tolist() for w in windows]))
            subprocess.run([args.llama_python, "-c", LLAMA_EVAL, str(path), str(Path(tmp) / "windows.json"),
                            str(Path(tmp) / "logits.npy")], check=True)
            llama = torch.from_numpy(np.load(Path(tmp) / "logits.npy"))
            ours, ref = [], []
            with torch.inference_mode():
                for w in windows:
                    ours.append(engine.forward(w[None])[0].float())
                    ref.append(engine.reference_logits(w[None])[0].float())
            ours, ref = torch.cat(ours), torch.cat(ref)
            row = {"policy": label, "gguf_mib": round(report["bytes"] / 2**20, 1), "by_type": report["by_type"],
                   "tokens": int(ours.shape[0]), "llama_cpp_vs_workbench_policy": compare(ours, llama),
                   "llama_cpp_vs_unmodified": compare(ref, llama), "workbench_policy_vs_unmodified": compare(ref, ours)}
            rows.append(row)
            print(json.dumps(row))
    result = {"model": "default", "corpus": corpus, "seq_len": args.seq_len, "rows": rows,
              "llama_cpp_python": subprocess.run([args.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                                 capture_output=True, text=True).stdout.strip()}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
