"""Our CUDA C++ kernels (`lowbit_mma.cu`): compiled on first use by NVRTC through torch (no toolkit install,
no build step) and launched on the current stream, with programmatic dependent launch on sm_90+, so the
decode step's CUDA graphs capture them like any other kernel.

    if available(x.device):
        launch("w4_mma<1, 8, 1, 4, true>", grid, block, [x, wp, sp, y, m, n, k], x.device)

`WORKBENCH_CUDA_KERNELS=0` turns them off (the tuner then times only the Triton kernels and the peers).
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path
import os

import torch

SOURCE = Path(__file__).with_name("lowbit_mma.cu")


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
    """The kernel `name` (a template instantiation, e.g. "w8_mma<1, 8, 4, true>") for one device."""
    with torch.cuda.device(device_index):
        return torch.cuda._compile_kernel(SOURCE.read_text(), name, nvcc_options=["-std=c++17"])


def launch(name: str, grid: tuple, block: tuple, args: list, device: torch.device) -> None:
    from workbench.kernels import pdl  # Triton: CUDA installs only
    index = device.index if device.index is not None else torch.cuda.current_device()
    kernel = compiled(name, index)
    if pdl.enabled(device):
        _launch_pdl(kernel.func, grid, block, args)
    else:
        kernel(grid=grid, block=block, args=args)


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
