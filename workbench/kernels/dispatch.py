"""Which Triton kernel serves a `WorkbenchLinear` on CUDA: chosen once per layer from its setting.

    sparsity (topk or a calibrated threshold) | weights            -> kernel
    ------------------------------------------+--------------------+-------------------------------------------
    yes                                       | model's bf16/fp16  | sparse_gemv over W^T (K, N)
    yes                                       | int8, per channel  | sparse_gemv over q^T (K, N): fused sparse+int8
    no                                        | int8 / int8-block / int4-gN | quant_gemv over the stored tensors
                                              |                    | (int4: or aten's tinygemm, if faster)
    yes                                       | int8-block / int4  | sparsify in torch, then quant_gemv
    no                                        | model's bf16/fp16  | none: cuBLAS is already at the bound

Anything else (fp8, per-channel WINA thresholds, and prefill: more than 64 tokens for quant_gemv, more
than 16 for sparse_gemv) keeps the reference path. Every path is graph-safe (no host sync), so the
decode step captures whole. Set WORKBENCH_KERNELS=0 to keep the reference paths everywhere.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from workbench.kernels.quant_gemv import MAX_TOKENS as QUANT_TOKENS, quant_gemv, tinygemm_pack
from workbench.kernels.sparse_gemv import MAX_TOKENS as SPARSE_TOKENS, gather_gemv, sparse_gemv
from workbench.kernels.topk import topk_select
from workbench.sparsity.rules import Cut


def kernels_enabled() -> bool:
    return os.environ.get("WORKBENCH_KERNELS", "1") != "0"


class LinearKernel:
    """The chosen kernel for one layer, with the weight layout it needs (built once, on first use).
    `cut` is the layer's sparsity as a typed `Cut` (or None: dense input)."""

    def __init__(self, layer, kind: str, cut: Cut | None, weight_t=None, scale=None):
        self.layer, self.kind, self.cut = layer, kind, cut
        self.weight_t, self.scale = weight_t, scale
        store = layer.store
        self.tinygemm = tinygemm_pack(store.tensors) if kind == "quant" and store.fmt.kernel_family == "int4" \
            and store.compute_dtype == torch.bfloat16 else None
        if cut is not None and cut.kind == "threshold":  # a calibrated constant cut
            self.const_cut = torch.full((SPARSE_TOKENS,), cut.threshold, device=layer.base.weight.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        rows = x.reshape(-1, x.shape[-1])
        sparse = self.cut is not None and not (self.layer.dense_multi_token and x.shape[-2] > 1)
        if rows.shape[0] > (SPARSE_TOKENS if self.kind == "sparse" else QUANT_TOKENS) or (
                self.kind == "sparse" and not sparse):
            return None  # prefill: the reference path (cuBLAS) is the right tool
        layer = self.layer
        if self.kind == "sparse":
            sel = self._selection(rows, x)
            counters = (layer.nonzero_seen, layer.entries_seen) if layer.track_stats else (None, None)
            if sel is not None and rows.shape[0] == 1:  # one token: walk only the kept weight rows
                bound = self.cut.keep if self.cut.kind == "topk" else rows.shape[1]  # the most it can keep
                y = gather_gemv(rows, sel.idx, sel.count, bound, self.weight_t, self.scale, *counters)
            else:
                cut = sel.cut if sel is not None else self.const_cut[:rows.shape[0]]
                y = sparse_gemv(rows, cut, self.weight_t, self.scale, *counters)
        else:
            if sparse:
                rows = layer._sparsify(rows) if self.cut.kind == "threshold" else self._topk_rows(rows, x)
            y = quant_gemv(rows, layer.store.tensors, tinygemm=self.tinygemm)
        return y.reshape(*x.shape[:-1], -1)

    def _selection(self, rows: torch.Tensor, x: torch.Tensor):
        """The top-k Selection for this input (shared by q/k/v and gate/up, or handed over by a fused
        norm/activation kernel of the decode step); None for a calibrated constant cut."""
        cache, key = self.layer.input_cache, (self.cut, "selection")
        if cache is not None and cache.matches(x, key):
            return cache.output
        if self.cut.kind == "threshold":
            return None  # no fused kernel chose the inputs: the masked-row kernel applies the constant
        sel = topk_select(rows, self.cut.keep)
        if cache is not None:
            cache.store(x, key, sel, None)
        return sel

    def _topk_rows(self, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        kept = rows.abs() > self._selection(rows, x).cut[:, None]
        if self.layer.track_stats:
            self.layer.nonzero_seen += kept.sum()
            self.layer.entries_seen += rows.numel()
        return rows * kept


def plan(layer) -> LinearKernel | None:
    """The kernel for `layer` (a WorkbenchLinear whose weights are on CUDA), or None for the reference path.

    Asked of the layer's typed entries: its sparsifier's `Cut` (None: no scalar cut, so no sparse
    kernel) and its stored format's `kernel_family` and spec; never of names or tensor ranks."""
    if not kernels_enabled():
        return None
    sparsifier, store = layer.sparsifier, layer.store
    cut = sparsifier.cut if sparsifier is not None else None
    if sparsifier is not None and cut is None:
        return None  # a rule with no scalar cut (WINA's per-channel thresholds): the reference path
    family = "dense" if store is None else store.fmt.kernel_family
    if family == "dense":  # the model's weight, or a cast store (a merged LoRA's weight)
        w = layer.base.weight if store is None else store.tensors["q"]
        if cut is None or w.dtype not in (torch.bfloat16, torch.float16):
            return None  # dense bf16: cuBLAS is already at the bound
        return LinearKernel(layer, "sparse", cut, w.detach().t().contiguous())
    if store.compute_dtype not in (torch.bfloat16, torch.float16) or family not in ("int8", "int4"):
        return None
    t = store.tensors
    if family == "int8" and not store.spec.group_size and cut is not None:  # per-row scales: fused sparse+int8
        return LinearKernel(layer, "sparse", cut, t["q"].t().contiguous(), t["scale"])
    return LinearKernel(layer, "quant", cut)


def kernel_forward(layer, x: torch.Tensor) -> torch.Tensor | None:
    """y for `x` through the layer's kernel, or None when the reference path should serve."""
    if layer.kernel is None:
        layer.kernel = plan(layer) or False
    if layer.kernel is False:
        return None
    return layer.kernel(x)


def describe(layer) -> str:
    k = layer.kernel if layer.kernel is not None else plan(layer)
    if not k:
        return "reference"
    if k.kind == "quant":
        return "quant_gemv" + ("|tinygemm" if k.tinygemm is not None else "")
    return "sparse_gemv" + ("+int8" if k.scale is not None else "")


Forward = Callable[[torch.Tensor], torch.Tensor]
