"""Figures of the bench results in this folder (HTML, and PNG where kaleido finds a browser).

    python experiments/speed/plot.py        # writes speed_<name>.html/.png next to each bench_*.json
"""
import json
from pathlib import Path

from workbench.viz import save_figure, speed_figure

HERE = Path(__file__).parent

for path in sorted(HERE.glob("bench_*.json")):
    result = json.loads(path.read_text())
    written = save_figure(speed_figure(result), HERE / path.stem.replace("bench_", "speed_"))
    print(", ".join(str(p) for p in written))
