import contextlib
import os
import socket
import threading
import time

import pytest
import torch

from workbench import Engine
from workbench.synthetic import TINY_ARCHITECTURES

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing_for_browser() -> str | None:
    import importlib.util
    import shutil
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        return "no Chromium on this machine (scripts/dev.sh setup installs Debian's)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install -e '.[dev]')"
    return None


# marker -> what the group needs; a group whose dependency is missing is skipped with the reason, except
# under CI=true, where the run fails in one line: a browser that could not be installed must not turn
# the panels' only real check into a green skip
REQUIREMENTS = {"browser": _missing_for_browser}


def pytest_collection_modifyitems(config, items):
    for marker, missing in REQUIREMENTS.items():
        group = [item for item in items if marker in item.keywords]
        reason = missing() if group else None
        if reason and in_ci():
            pytest.exit(f"CI=true and {reason}: the {marker} tests cannot run", returncode=3)
        for item in group if reason else []:
            item.add_marker(pytest.mark.skip(reason=reason))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=TINY_ARCHITECTURES)
def tiny_name(request) -> str:
    return f"synthetic:{request.param}"


@pytest.fixture
def tiny_engine(tiny_name) -> Engine:
    return Engine.from_pretrained(tiny_name, device="cpu")


@pytest.fixture(scope="session")
def default_engine() -> Engine:
    """The real default model (SmolLM2-135M-Instruct), loaded once for all slow tests."""
    return Engine.from_pretrained("default", device="cpu")


@pytest.fixture
def sample_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 24), generator=g)


@contextlib.contextmanager
def live_server(server):
    """A real uvicorn server for a `workbench.server.build` result on a free loopback port, in a thread:
    yields the port; on exit the web server stops and the scheduler, batcher and controller close."""
    import uvicorn

    from workbench.server import close
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    web = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not web.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield port
    finally:
        web.should_exit = True
        thread.join(10)
        close(server)
