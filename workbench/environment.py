"""The versions and machine recorded with every result file, so a number can be traced to what made it."""
from __future__ import annotations

import importlib.util
import platform

import torch


def environment(device: torch.device | str | None = None, bandwidth: float | None = None) -> dict:
    """Python, torch, transformers (and Triton where present), the machine, the GPU or the CPU threads;
    with `bandwidth`, the copy bandwidth measured in the same run (bytes/s)."""
    import transformers  # here, not at the top: `import workbench` stays free of transformers
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "machine": platform.machine(), "device": str(dev)}
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
        env["triton"] = _version("triton")
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    if bandwidth is not None:
        env["copy_bandwidth_gb_s"] = bandwidth / 1e9
    return env


def _version(package: str) -> str | None:
    if importlib.util.find_spec(package) is None:
        return None
    from importlib.metadata import version
    return version(package)
