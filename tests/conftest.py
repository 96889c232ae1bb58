import os

import pytest
import torch

from workbench import Engine
from workbench.synthetic import TINY_ARCHITECTURES

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
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
