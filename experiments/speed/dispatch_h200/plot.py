"""The speed-up figure of the latest H200 matrix (one run, every ratio against dense in that run):

    python experiments/speed/dispatch_h200/plot.py      # writes speedup_h200.html / .png here

Open circles: what issue "compression that pays on the GPU" asks at each batch size.
"""
import json
from pathlib import Path

from workbench.viz import save_figure, speedup_figure

HERE = Path(__file__).parent
RUNS = ("../bench_llama-3-8b_h200.json",)  # run 18: `bash experiments/speed/run.sh h200`
TARGETS = {"threshold50": {1: 1.45, 8: 1.05, 32: 0.97, 64: 0.97},
           "threshold50+int8": {1: 1.9, 8: 1.3, 32: 0.97, 64: 0.97},
           "int8": {1: 1.6, 8: 1.5, 32: 1.0, 64: 0.97},
           "int4-g64": {1: 2.0, 8: 1.6, 32: 1.1, 64: 0.97}}

results = [json.loads((HERE / name).read_text()) for name in RUNS]
fig = speedup_figure(results, TARGETS, title="Llama-3-8B shape on an H200: decode speed-up over dense (same run)")
print(", ".join(str(p) for p in save_figure(fig, HERE / "speedup_h200", html=False)))
