"""Calibration artifacts on disk: one safetensors file of tensors plus string metadata, written atomically
and read back with its format name and version checked (a bad file is one line, never a traceback)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from workbench.errors import PolicyError


def save_artifact(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in meta.items()})
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path


def load_artifact(path: str | Path, what: str, fmt: str, version: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a file whose metadata says `format` = fmt and `version` = version."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a corrupt file
        raise PolicyError(f"{what} {path} cannot be read: {e}") from None
    if meta.get("format") != fmt or meta.get("version") != version:
        raise PolicyError(f"{path} is not a version-{version} workbench {what}")
    return meta, tensors
