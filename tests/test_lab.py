"""`workbench lab` serves the curated notebooks (the README's main command ends in it)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lab_serves_the_notebooks(tmp_path):
    port, token = free_port(), "workbench-test"
    env = dict(os.environ, HOME=str(tmp_path), JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTER_DATA_DIR=str(tmp_path / "data"),
               WORKBENCH_CACHE=os.environ.get("WORKBENCH_CACHE", os.path.expanduser("~/.cache/workbench")))
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "lab", "--no-browser", "--port", str(port), "--",
                             f"--IdentityProvider.token={token}", "--ServerApp.port_retries=0",
                             "--ServerApp.ip=127.0.0.1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        contents = None
        for _ in range(120):
            try:
                url = f"http://127.0.0.1:{port}/api/contents?token={token}"
                contents = json.load(urllib.request.urlopen(url, timeout=2))
                break
            except OSError:
                time.sleep(0.5)
        assert contents is not None, "JupyterLab did not answer within 60 s"
        names = {item["name"] for item in contents["content"]}
        assert {"01_quickstart.ipynb", "02_activation_sparsity.ipynb"} <= names
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
