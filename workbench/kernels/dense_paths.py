"""The dense decode matmul: cuBLAS or our tensor-core GEMV on the same stored bf16/fp16 weight, whichever
the tuner measured faster for this shape and token count.

    y = dense_linear(x, weight)          # = F.linear(x, weight), x (..., K)

Why not cuBLAS alone: at 1-16 tokens cuBLAS reads the small projections' weights at 2.7-3.3 TB/s on the
H200 and adds a split-K reduction launch to them; `gemv_bf16_mma` (one launch, the weight's rows as the
MMA's A operand) reads q|k|v and o 10-20% faster (`experiments/speed/kernels/mma_bf16_h200.json`). Same
math: bf16 products, float32 accumulation; only the order of the sum differs. Both candidates are timed
on cold weights (copies beyond the L2), as a decode step meets them. Past 64 tokens, off CUDA, without our
CUDA C++ kernels (`WORKBENCH_CUDA_KERNELS=0`) or for a weight the kernel does not take: F.linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from workbench.kernels import gemv_bf16_mma, mma_cuda
from workbench.kernels.tuning import capturing, remembered, tuned

TOLERANCE = 1e-2  # relative to cuBLAS's output: a kernel beyond it is not offered (said once)
_REJECTED: set = set()


def dense_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    k, n = weight.shape[1], weight.shape[0]
    rows = x.reshape(-1, k)
    m = rows.shape[0]
    if (m > mma_cuda.MAX_TOKENS or x.device.type != "cuda" or x.dtype != weight.dtype
            or not gemv_bf16_mma.fits(weight) or not mma_cuda.available(x.device)):
        return F.linear(x, weight)
    rows = rows if rows.is_contiguous() else rows.contiguous()
    key = ("dense_paths", n, k, weight.dtype, m)
    cfg = remembered(key)
    if cfg is None:
        if capturing():  # the graphs' warm-up runs every step eagerly first; a capture only replays choices
            return F.linear(x, weight)
        cfg = tuned(key, _candidates(rows, weight), _cold_launcher(rows, weight))
    return _launch(rows, weight, cfg).view(*x.shape[:-1], n)


def _launch(rows: torch.Tensor, weight: torch.Tensor, cfg: dict) -> torch.Tensor:
    if cfg["impl"] == "cublas":
        return F.linear(rows, weight)
    return gemv_bf16_mma.launch(rows, weight, cfg)


def _candidates(rows: torch.Tensor, weight: torch.Tensor) -> list[dict]:
    """cuBLAS first (the untuned default), then our kernel's configs if its output agrees with cuBLAS's."""
    out = [{"impl": "cublas"}]
    key = (weight.shape, weight.dtype, rows.shape[0])
    if key in _REJECTED:
        return out
    ours = [dict(impl="w16mma", **c) for c in gemv_bf16_mma.candidates(rows.shape[0], *weight.shape)]
    try:
        want = F.linear(rows, weight).float()
        err = ((_launch(rows, weight, ours[0]).float() - want).norm() / want.norm().clamp_min(1e-30)).item()
    except Exception as e:  # noqa: BLE001 - a kernel that does not compile here is not a choice
        err, why = float("inf"), f"{type(e).__name__}: {str(e)[:160]}"
    else:
        why = f"differs by {err:.1e} (relative) from cuBLAS"
    if not err < TOLERANCE:
        _REJECTED.add(key)
        from workbench.kernels.peers import say_once
        say_once(("dense_paths",) + key, "w16mma skipped for %dx%d at %d tokens: %s", *weight.shape,
                 rows.shape[0], why)
        return out
    return out + ours


def _cold_launcher(rows: torch.Tensor, weight: torch.Tensor):
    """A launch of a config over enough copies of the weight that they do not stay in the L2 between
    calls (a decode step streams 16 GB of weights through a 60 MB L2); the tuner compares configs, so
    the calls per copy only scale every candidate's time alike. The copies live for the tuning only."""
    copies: list[torch.Tensor] = []  # made on the first launch: a choice found on disk needs none

    def launch(cfg: dict) -> None:
        if not copies:
            l2 = getattr(torch.cuda.get_device_properties(rows.device), "L2_cache_size", 64 << 20)
            nbytes = weight.numel() * weight.element_size()
            copies.extend([weight] + [weight.clone() for _ in range(max(0, -(-3 * l2 // nbytes) - 1))])
        for w in copies:
            _launch(rows, w, cfg)
    return launch
