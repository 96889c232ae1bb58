"""Packaging facts: conda and pip list the same dependencies; `import workbench` stays light."""
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"])
    for name, deps in project["optional-dependencies"].items():
        if name == "cuda":  # a CUDA machine's extra kernels: not part of the CPU environment
            continue
        wanted |= {d for d in deps if not d.startswith("workbench[")}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1
    assert set(pip_lists[0]) == wanted


def test_import_is_light():
    code = ("import sys, workbench; heavy = {'plotly', 'ipywidgets', 'peft', 'fastapi', 'transformers'} & "
            "set(sys.modules); import torch; "
            "print(sorted(heavy), torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] False"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/dev.sh test" in readme.split("\n## ")[0]
    assert "scripts/dev.sh lab" in readme.split("\n## ")[0]
    assert "exec bash scripts/dev.sh test" in ci
