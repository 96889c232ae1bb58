"""Programmatic dependent launch (Hopper and later): overlap each kernel's launch with the one before it.

A decode step is ~300 short kernels in a row; between two of them the GPU idles while the next grid is
scheduled and its first loads come back (a few microseconds, a large share of a 4-10 us GEMV). With PDL
the next kernel is launched while this one still runs: its programs become resident, prefetch into L2 the
weight bytes they will read first (weights never change during decode, so reading them early is safe),
and then wait in hardware (`griddepcontrol.wait`) until the previous kernel has finished and its writes
are visible. Everything a kernel reads from its producers, and everything it writes, comes after that
wait, so the math and the order of every write are those of a plain launch. A kernel lets its successor
launch only once it has passed its own wait, so at most one kernel is queued ahead.

Kernels launched without PDL (cuBLAS, torch's own) are ordinary stream dependencies: a PDL kernel after
one simply starts when it ends. Off on the CPU, in Triton's interpreter, on GPUs before sm_90 and with
WORKBENCH_PDL=0 (to compare: `workbench bench` runs either way).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.lru_cache(maxsize=None)
def _supported(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def enabled(device) -> bool:
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    if os.environ.get("WORKBENCH_PDL", "1") == "0":
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device())


def launch_kwargs(device) -> dict:
    """The kernel's `PDL` constexpr and, when on, Triton's launch option: `kernel[grid](..., **launch_kwargs(d))`."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {"PDL": False}


@triton.jit
def enter(PDL: tl.constexpr):
    """Wait for the previous kernel (its writes visible), then let the next one launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs, nbytes, PDL: tl.constexpr):
    """Before `enter`: one bulk L2 prefetch of `nbytes` (a multiple of 16, from 16-byte aligned `ptrs`) per
    element of `ptrs`, typically the first bytes of each weight row a program reads. A hint: no data moves
    to registers, nothing waits on it."""
    if PDL:
        tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;", "=r,l,r",
                                  [ptrs, nbytes], dtype=tl.int32, is_pure=False, pack=1)
