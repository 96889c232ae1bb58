"""Activation-sparsity rules: which entries of a linear layer's input to zero.

Every rule zeroes input entries x_i of y = W x, which lets a kernel skip column i of W (TEAL's insight:
the inputs of all seven projections of a Llama block are heavy-tailed around zero, so most of the mass
survives a magnitude cut). The rules differ in the score and in how the cut is set:

* ``topk``      exact per-token top-k by |x_i|; k = round((1 - target) * D). Needs no calibration.
* ``threshold`` TEAL: zero |x_i| < t, t calibrated per module from activation histograms so that the
                fraction zeroed on the calibration text equals the target.
* ``weighted``  WINA: score |x_i| * ||W[:, i]||_2, i.e. a per-column threshold t / ||W[:, i]||,
                calibrated the same way on the score's histogram.
* ``greedy``    TEAL's block-wise greedy allocation: a model-wide target is split across the
                projections of each block by measured block-output error, then `threshold` runs with
                each module's own target.
* ``dense``     the identity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

from workbench.errors import PolicyError
from workbench.policy import SPARSITY_RULES, Sparsity


@dataclass(frozen=True)
class Cut:
    """A scalar magnitude cut per token, the form a kernel applies in-kernel: keep the `keep` largest
    |x_i| (top-k), or keep |x_i| > `threshold` (a calibrated constant). Hashable: layers that read the same
    input under equal cuts share one sparsified input (q/k/v, gate/up)."""

    kind: Literal["topk", "threshold"]
    value: float

    def __post_init__(self):
        if self.kind not in ("topk", "threshold"):
            raise ValueError(f"a cut is 'topk' or 'threshold', got {self.kind!r}")

    @property
    def keep(self) -> int:
        return int(self.value)

    @property
    def threshold(self) -> float:
        return float(self.value)


@dataclass(frozen=True)
class Sparsifier:
    """A rule bound to one module: `fn` is the reference math; `cut` is the same rule as a scalar cut a
    kernel can apply, or None where it has none (WINA's per-channel thresholds), which also means its
    output is never shared between modules."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    cut: Cut | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


# ---- pure tensor functions ---------------------------------------------------------------------------------
def keep_count(dim: int, target: float) -> int:
    """How many of `dim` entries top-k keeps at sparsity `target` (at least one)."""
    return max(1, dim - round(target * dim))


def topk_sparsify(x: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep exactly `keep` entries of largest |x| along the last dim; zero the rest.

    The cut is the (D - keep)-th smallest |x| (kthvalue: about twice as fast as topk on CPU); where ties
    at the cut would keep fewer than `keep`, exact topk decides.
    """
    dim = x.shape[-1]
    if keep >= dim:
        return x
    a = x.abs()
    cut = a.kthvalue(dim - keep, dim=-1, keepdim=True).values  # (..., 1)
    mask = a > cut
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return x * mask  # no host sync inside a CUDA graph: ties at the cut keep fewer (measure-zero on floats)
    if bool((mask.sum(-1) != keep).any()):
        idx = a.topk(keep, dim=-1).indices  # (..., keep)
        return torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))
    return x * mask


def threshold_sparsify(x: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """Zero entries with |x| below `threshold` (a scalar, or one per input channel: shape (D,)).

    A scalar cut is hardshrink, one fused pass over x instead of abs, compare and multiply.
    """
    if isinstance(threshold, (int, float)):
        return F.hardshrink(x, float(threshold))
    return x * (x.abs() >= threshold)


# ---- registry entries -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SparsityRuleEntry:
    name: str
    needs_calibration: bool
    build: Callable[[Sparsity, torch.Tensor, Any], Sparsifier] | None = None
    needs_greedy: bool = False
    doc: str = ""

    def validate(self, spec: Sparsity) -> None:
        unknown = set(spec.params)
        if unknown:
            raise PolicyError(f"sparsity rule {spec.rule!r} takes no parameter(s) {', '.join(sorted(unknown))}")


def _build_topk(spec: Sparsity, weight: torch.Tensor, calibration: Any) -> Sparsifier:
    keep = keep_count(weight.shape[1], spec.target)
    return Sparsifier(lambda x: topk_sparsify(x, keep), Cut("topk", keep))


def _require(calibration: Any, spec: Sparsity):
    if calibration is None:
        raise PolicyError(f"sparsity rule {spec.rule!r} needs a calibration artifact; run `workbench calibrate`")
    return calibration


def _build_threshold(spec: Sparsity, weight: torch.Tensor, calibration: Any) -> Sparsifier:
    t = float(_require(calibration, spec).threshold(spec.target))
    return Sparsifier(lambda x: F.hardshrink(x, t), Cut("threshold", t))


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """||W[:, i]||_2 for each input channel i, in float32: shape (in_features,)."""
    return weight.detach().float().norm(dim=0)


def _build_weighted(spec: Sparsity, weight: torch.Tensor, calibration: Any) -> Sparsifier:
    t = float(_require(calibration, spec).threshold(spec.target, weighted=True))
    per_channel = (t / column_norms(weight).clamp_min(1e-12)).to(weight.dtype)  # (D,)
    return Sparsifier(lambda x: threshold_sparsify(x, per_channel))


def _build_greedy(spec: Sparsity, weight: torch.Tensor, calibration: Any) -> Sparsifier:
    cal = _require(calibration, spec)
    t = float(cal.threshold(cal.greedy_target(spec.target)))
    return Sparsifier(lambda x: F.hardshrink(x, t), Cut("threshold", t))


SPARSITY_RULES.register("dense", SparsityRuleEntry("dense", False, doc="no sparsity: the identity"))
SPARSITY_RULES.register("topk", SparsityRuleEntry("topk", False, _build_topk, doc="exact per-token top-k by |x|"))
SPARSITY_RULES.register("threshold", SparsityRuleEntry("threshold", True, _build_threshold,
                                                       doc="TEAL: calibrated per-module magnitude threshold"))
SPARSITY_RULES.register("weighted", SparsityRuleEntry("weighted", True, _build_weighted,
                                                      doc="WINA: |x_i| * ||W[:, i]|| against a calibrated threshold"))
SPARSITY_RULES.register("greedy", SparsityRuleEntry("greedy", True, _build_greedy, needs_greedy=True,
                                                    doc="TEAL block-wise greedy allocation, then threshold"))
