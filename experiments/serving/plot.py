"""Figures for the serving results: serving_X.json -> serving_X.png, for every results file here
(the notebook draws the same figure live).

    python experiments/serving/plot.py
"""
import json
from pathlib import Path

from workbench.viz import save_figure, serving_figure

HERE = Path(__file__).parent

if __name__ == "__main__":
    for path in sorted(HERE.glob("serving_*.json")):
        result = json.loads(path.read_text())
        print(*save_figure(serving_figure(result), path.with_suffix(""), html=False))
