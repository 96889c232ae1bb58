"""Our CUDA C++ kernels (`lowbit_mma.cu`, `sparse_gemv.cu`): compiled on first use by NVRTC through torch (no toolkit install,
no build step) and launched on the current stream, with programmatic dependent launch on sm_90+, so the
decode step's CUDA graphs capture them like any other kernel.

    if available(x.device):
        launch("w4_mma<1, 8, 1, 4, 1, true>", grid, block, [x, wp, sp, y, m, n, k], x.device)

`WORKBENCH_CUDA_KERNELS=0` turns them off (the tuner then times only the Triton kernels and the peers).
"""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

# compiled as one source, in this order (the sparse GEMV uses the low-bit file's helpers)
SOURCES = tuple(Path(__file__).with_name(f) for f in ("lowbit_mma.cu", "sparse_gemv.cu"))
MAX_TOKENS = 64
TILE = 16  # output rows per MMA tile (a block owns 1-4 of them)


def available(device) -> bool:
    """Whether these kernels can run on `device`: a CUDA GPU with mma.sync m16n8k16 bf16 (sm_80+) and
    torch's NVRTC kernel compiler."""
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get("WORKBENCH_CUDA_KERNELS", "1") == "0":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] >= 8 and hasattr(torch.cuda, "_compile_kernel")


@functools.lru_cache(maxsize=None)
def compiled(name: str, device_index: int):
    """The kernel `name` (a template instantiation, e.g. "w8_mma<1, 8, 4, 1, true>") for one device."""
    with torch.cuda.device(device_index):
        source = "\n".join(f.read_text() for f in SOURCES)
        return torch.cuda._compile_kernel(source, name, nvcc_options=["-std=c++17"])


def launch(name: str, grid: tuple, block: tuple, args: list, device: torch.device) -> None:
    from workbench.kernels import pdl  # Triton: CUDA installs only
    index = device.index if device.index is not None else torch.cuda.current_device()
    kernel = compiled(name, index)
    if pdl.enabled(device):
        _launch_pdl(kernel.func, grid, block, args)
    else:
        kernel(grid=grid, block=block, args=args)


def token_tiles(m: int) -> int:
    """Tiles of 8 tokens a launch computes for m tokens (a compiled variant each: 1, 2, 4 or 8)."""
    return next(nt for nt in (1, 2, 4, 8) if 8 * nt >= m)


def configs(steps: int, m: int, ahead_few: tuple, ahead_many: tuple, row_tiles: bool = False,
            row_cost: int = 1) -> list[dict]:
    """Launch configs worth timing, the untuned default first. warps: the K split over a block's warps
    (at most one per step of `steps`, and the reduction's shared memory <= 32 KB); ahead: steps whose
    weights each warp loads before using the first (`ahead_few` up to 16 tokens, else `ahead_many`);
    rows (kernels with `row_tiles`): 16-row tiles per block, more than one from 32 tokens on, where x is
    most of what a block reads. Several tiles only where they fit the registers without spilling (ptxas
    on sm_90): rows x token tiles x `row_cost` (the kernel's fragments per tile and step) <= 16, at most
    8 warps (a block of 512 threads gets 128 registers each), rows x ahead <= 4."""
    nt = token_tiles(m)
    aheads = ahead_few if nt <= 2 else ahead_many
    rows = [r for r in (1, 2, 4) if r == 1 or (nt >= 4 and r * nt * row_cost <= 16)] if row_tiles else [1]
    out = [{"warps": w, "ahead": a, "rows": r} for r in rows for w in (8, 4, 16)
           if steps >= w and w * nt <= 64 and (r == 1 or w <= 8) for a in aheads if r == 1 or a * r <= 4]
    return out or [{"warps": 1, "ahead": 1, "rows": 1}]


def multiply(kernel: str, x: torch.Tensor, k: int, n: int, operands: list, cfg: dict, dtypes: tuple,
             y: torch.Tensor | None = None, params: tuple = (), row_tiles: bool = False) -> torch.Tensor:
    """y (M, N) = x (M, K) times the weight in `operands` through `kernel`<token tiles, warps, *params,
    ahead, [rows,] bf16>, for M <= 64 tokens, in x's dtype. `row_tiles`: the kernel takes the rows
    template argument (16-row tiles per block, `cfg["rows"]`, default 1)."""
    m = x.shape[0]
    if x.dim() != 2 or x.shape[1] != k or m > MAX_TOKENS or x.dtype not in dtypes:
        raise ValueError(f"{kernel} takes x (M <= {MAX_TOKENS}, K={k}) in {'/'.join(map(str, dtypes))}, got "
                         f"{tuple(x.shape)} {x.dtype}")
    x = x.contiguous()
    if x.data_ptr() % 16:  # the kernels load 16 bytes at a time
        x = x.clone()
    if y is None:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    rows = cfg.get("rows", 1) if row_tiles else 1
    targs = (token_tiles(m), cfg["warps"], *params, cfg["ahead"]) + ((rows,) if row_tiles else ())
    name = f"{kernel}<{', '.join(map(str, targs))}, {'true' if x.dtype == torch.bfloat16 else 'false'}>"
    blocks = -(-(-(-n // TILE)) // rows)
    launch(name, (blocks, 1, 1), (32 * cfg["warps"], 1, 1), [x, *operands, y, m, n, k], x.device)
    return y


# ---- programmatic dependent launch through the driver (torch's launcher has no launch attributes) ----------------
class _Attribute(ctypes.Structure):  # CUlaunchAttribute: id, padding to 8 bytes, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _Config(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_Attribute)), ("num_attrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION (cuda.h)


def _launch_pdl(func, grid, block, args) -> None:
    """cuLaunchKernelEx with programmatic stream serialization: this grid may start while the previous
    kernel in the stream finishes; the kernel's `griddepcontrol.wait` orders its reads of x after it."""
    from torch.cuda._utils import _check_cuda, _get_gpu_runtime_library
    keep = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a) for a in args]
    params = (ctypes.c_void_p * len(keep))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in keep])
    attr = _Attribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value[0] = 1
    cfg = _Config(grid=(ctypes.c_uint * 3)(*grid), block=(ctypes.c_uint * 3)(*block), shared=0,
                  stream=torch.cuda.current_stream().cuda_stream, attrs=ctypes.pointer(attr), num_attrs=1)
    _check_cuda(_get_gpu_runtime_library().cuLaunchKernelEx(ctypes.byref(cfg), func, params, None))
