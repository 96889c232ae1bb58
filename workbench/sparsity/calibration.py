"""The calibration artifact: activation histograms of every block linear's input, thresholds for any target.

Run the calibration part of the corpus through the unmodified model with temporary forward pre-hooks;
for each linear layer accumulate a histogram of log10|x| (TEAL's magnitude) and of log10(|x| * ||W[:, i]||)
(WINA's score). A target sparsity s becomes a threshold by inverting the histogram's CDF at s
(log-linear interpolation inside a bin, 0.005 decades wide). Histograms are exact counts, so the same model
and text give the same artifact on every run.

The artifact is one safetensors file (tensors plus JSON metadata: format version, model fingerprint,
corpus, token count, Python version) saved next to the policy or in the cache. Loading checks the
fingerprint, so thresholds from another model are refused instead of silently misapplied.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.artifacts import load_artifact, save_artifact
from workbench.errors import PolicyError
from workbench.policy import BLOCK_ROLES, SPARSITY_RULES
from workbench.roles import linear_modules

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = "workbench-calibration"
ARTIFACT_VERSION = 1
LOG_MIN, LOG_MAX, BINS = -10.0, 4.0, 2800  # log10 magnitude range and resolution (0.005 decades)
DEFAULT_CALIBRATION_TOKENS = 16384


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the architecture and a strided sample of every original parameter.

    Fast and order-stable, and the same whatever policy is applied: wrappers' kept originals are read
    under their original names, packed copies and LoRA adapters (`lora_*`) are ignored.
    """
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    named = ((n.replace(".base_layer.", ".").replace(".base.", "."), p) for n, p in model.named_parameters()
             if "lora_" not in n)
    for name, p in sorted(named, key=lambda item: item[0]):
        h.update(name.encode())
        if p.device.type == "meta":  # released original (keep_reference=False): only its shape is known
            h.update(str(tuple(p.shape)).encode())
            continue
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)][:1024].float().cpu()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def histogram(values: torch.Tensor) -> torch.Tensor:
    """Counts of log10(values) in BINS bins over [LOG_MIN, LOG_MAX]; zeros land in the first bin."""
    logs = values.float().clamp_min(10 ** LOG_MIN).log10().clamp(LOG_MIN, LOG_MAX)
    return torch.histc(logs, bins=BINS, min=LOG_MIN, max=LOG_MAX).double().cpu()


def threshold_from_histogram(hist: torch.Tensor, target: float) -> float:
    """The magnitude below which a `target` fraction of the histogram's mass lies."""
    if target <= 0:
        return 0.0
    cdf = hist.cumsum(0) / hist.sum()
    i = int(torch.searchsorted(cdf, torch.tensor([target], dtype=cdf.dtype)).item())
    i = min(i, BINS - 1)
    below = cdf[i - 1].item() if i > 0 else 0.0
    frac = (target - below) / max(cdf[i].item() - below, 1e-30)
    width = (LOG_MAX - LOG_MIN) / BINS
    return 10 ** (LOG_MIN + (i + min(max(frac, 0.0), 1.0)) * width)


@dataclass
class ModuleCalibration:
    """What one linear layer needs from the artifact: its histograms and its greedy allocation path."""

    fqn: str
    hist: torch.Tensor
    weighted_hist: torch.Tensor
    greedy_path: list | None = None  # [(layer_sparsity, module_sparsity), ...] rising

    def threshold(self, target: float, weighted: bool = False) -> float:
        return threshold_from_histogram(self.weighted_hist if weighted else self.hist, target)

    def greedy_target(self, model_target: float) -> float:
        """This module's sparsity when its block runs at `model_target` under the greedy allocation."""
        if not self.greedy_path:
            raise PolicyError("the calibration artifact has no greedy allocation; run `workbench calibrate --greedy`")
        xs = [p[0] for p in self.greedy_path]
        ys = [p[1] for p in self.greedy_path]
        if model_target >= xs[-1]:
            return ys[-1]
        j = next(k for k, x in enumerate(xs) if x >= model_target)
        if j == 0 or xs[j] == xs[j - 1]:
            return ys[j]
        w = (model_target - xs[j - 1]) / (xs[j] - xs[j - 1])
        return ys[j - 1] + w * (ys[j] - ys[j - 1])


@dataclass
class Calibration:
    """Per-module histograms (and optionally greedy allocation paths) for one model."""

    fingerprint: str
    modules: dict[str, ModuleCalibration]
    meta: dict = field(default_factory=dict)
    path: str | None = None

    @property
    def has_greedy(self) -> bool:
        return any(m.greedy_path for m in self.modules.values())

    def for_module(self, fqn: str) -> ModuleCalibration | None:
        return self.modules.get(fqn)

    def check_model(self, model: nn.Module) -> None:
        mine = model_fingerprint(model)
        if mine != self.fingerprint:
            where = self.path or "the calibration artifact"
            raise PolicyError(f"{where} was made for another model (fingerprint {self.fingerprint}, "
                              f"this model is {mine}, {self.meta.get('model', '?')!r} made it); recalibrate")

    def save(self, path: str | Path) -> Path:
        tensors = {}
        for fqn, m in self.modules.items():
            tensors[f"hist/{fqn}"] = m.hist.contiguous()
            tensors[f"weighted/{fqn}"] = m.weighted_hist.contiguous()
        greedy = {fqn: m.greedy_path for fqn, m in self.modules.items() if m.greedy_path}
        meta = {**self.meta, "format": ARTIFACT_FORMAT, "version": str(ARTIFACT_VERSION),
                "fingerprint": self.fingerprint, "bins": json.dumps([LOG_MIN, LOG_MAX, BINS]),
                "greedy": json.dumps(greedy)}
        path = save_artifact(path, tensors, meta)
        self.path = str(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        path = Path(path)
        if not path.is_file():
            raise PolicyError(f"calibration artifact not found: {path}")
        meta, tensors = load_artifact(path, "calibration artifact", ARTIFACT_FORMAT, str(ARTIFACT_VERSION))
        if json.loads(meta["bins"]) != [LOG_MIN, LOG_MAX, BINS]:
            raise PolicyError(f"{path} uses another histogram layout; recalibrate")
        greedy = json.loads(meta.pop("greedy", "{}"))
        modules = {}
        for key, hist in tensors.items():
            kind, fqn = key.split("/", 1)
            if kind == "hist":
                modules[fqn] = ModuleCalibration(fqn, hist, tensors[f"weighted/{fqn}"], greedy.get(fqn))
        return cls(meta.pop("fingerprint"), modules, meta, str(path))


def calibration_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(fqn, base linear) for every block linear the default policy can sparsify."""
    out = []
    for fqn, module, role in linear_modules(model):
        if role in BLOCK_ROLES:
            out.append((fqn, module.base if getattr(module, "is_workbench_linear", False) else module))
    return out


@contextlib.contextmanager
def input_hooks(targets: list[tuple[str, nn.Module]], fn):
    """Temporary forward pre-hooks calling fn(fqn, module, x) on each target's input; removed on exit."""
    handles = [m.register_forward_pre_hook(lambda mod, args, fqn=fqn: fn(fqn, mod, args[0]))
               for fqn, m in targets]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def needs_calibration(policy: Any) -> tuple[bool, bool]:
    """(needs histograms, needs greedy) for a policy."""
    settings = [policy.default] + [r.setting for r in policy.rules]
    entries = [SPARSITY_RULES.get(s.sparsity.rule) for s in settings if not s.sparsity.is_identity]
    return any(e.needs_calibration for e in entries), any(e.needs_greedy for e in entries)
