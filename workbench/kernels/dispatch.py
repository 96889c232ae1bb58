"""Which kernel serves a `WorkbenchLinear` (or a joined q|k|v, gate|up) on CUDA at decode: 1-64 tokens.

A `LinearKernel` holds every path that computes the layer's exact math for its setting, and the tuner
(`tuning.tuned`) times them per token count, once per shape, inside CUDA graphs; the fastest serves:

    sparsity cut | weights             | candidate paths (all the same math)
    -------------+---------------------+------------------------------------------------------------------
    none         | int8 / int4         | `QuantPaths`: our GEMVs, quant_gemv, tinygemm, gemlite
    none         | model's bf16/fp16   | none: cuBLAS (the reference path) is already at the bound
    top-k or     | model's bf16/fp16   | sparse GEMVs over W^T (skip the weight rows of zeroed inputs),
    threshold    |                     | or the masked input through cuBLAS
                 | int8, row scales    | fused sparse+int8 GEMVs over q^T, or the masked input through QuantPaths
                 | int8-block / int4   | the masked input through QuantPaths

The sparse input comes masked and counted from the fused norm / activation kernel of the decode step
(`runtime.fused`: key `(cut, "premasked")` in the shared input cache); elsewhere the layer's own rule masks
it in torch. At one token the sparse kernels read only the kept weight rows; with several tokens they read
the union of the tokens' kept rows, which random activations make nearly all of them from ~4 tokens on:
there the masked dense path wins and is chosen. Prefill (more than 64 tokens), fp8, and rules with no
scalar cut (WINA) keep the reference path, said once in the log. WORKBENCH_KERNELS=0: reference everywhere.
"""
from __future__ import annotations

import os

import torch

from workbench.kernels import gemv_sparse
from workbench.kernels.dense_paths import dense_linear
from workbench.kernels.peers import say_once
from workbench.kernels.quant_paths import MAX_TOKENS, QuantPaths
from workbench.kernels.sparse_gemv import MAX_TOKENS as OLD_SPARSE_TOKENS, sparse_gemv
from workbench.kernels.tuning import capturing, remembered, tuned
from workbench.sparsity.rules import Cut

PREMASKED = "premasked"  # sparsified and counted by the kernel that produced the input
MASKED_HERE = "kernel-masked"  # sparsified by `mask_rows` for the first of several layers reading it
PROBE_VERSION = 3  # in the tuning key: choices timed before `independent_rows` (2) or before the CUDA C++
# sparse kernel (3) are stale


def kernels_enabled() -> bool:
    return os.environ.get("WORKBENCH_KERNELS", "1") != "0"


class LinearKernel:
    """The paths for one weight (one layer's, or several layers' joined along the outputs) under one cut.

    `layers` are the WorkbenchLinears it serves (their counters, their shared input cache); `dense` the
    model-dtype weight (N, K) for the masked-cuBLAS path, `tensors` the packed ones (int8/int4). Layouts
    are built on first use, so planning a kernel that never runs costs no memory."""

    def __init__(self, layers: list, cut: Cut | None, family: str, dense: torch.Tensor | None = None,
                 tensors: dict | None = None, dtype: torch.dtype = torch.bfloat16):
        self.layers, self.cut, self.family = layers, cut, family
        self.dense, self.tensors, self.dtype = dense, tensors, dtype
        self.kind = "quant" if cut is None else "sparse"
        self._quant = self._sparse = None
        self._zeros = None  # thresholds of 0 for inputs that arrive masked (one per token, made once)
        # WORKBENCH_SPARSE_PATH=sparse|masked pins a sparse layer to one kind of path (tests, comparisons)
        self.pinned = os.environ.get("WORKBENCH_SPARSE_PATH") if cut is not None else None
        self.chosen: dict[int, str] = {}  # token count -> the path the tuner kept (bench reports it)
        self.paths: dict[int, dict] = {}  # token count -> its config (sparse layers)
        self.joined = False  # True while the fused step serves this layer through a joined kernel

    # ---- the paths ----------------------------------------------------------------------------------------------
    @property
    def quant(self) -> QuantPaths | None:
        if self._quant is None and self.family in ("int8", "int4"):
            self._quant = QuantPaths(self.tensors, self.family, self.dtype)
        return self._quant

    @property
    def sparse_weight(self) -> dict | None:
        """W^T (K, N) for the sparse GEMVs: bf16/fp16, or int8 q^T with row scales (fused sparse+int8)."""
        if self._sparse is None and self.cut is not None:
            if capturing():  # the tuner and the graphs run each path eagerly first
                raise RuntimeError("LinearKernel: W^T must be built before a CUDA graph capture")
            if self.family == "dense":
                self._sparse = gemv_sparse.pack(self.dense.detach())
            elif self.family == "int8" and self.tensors["scale"].dim() == 1:
                self._sparse = gemv_sparse.pack_int8(self.tensors)
            else:
                self._sparse = False
        return self._sparse or None

    def _prune(self) -> None:
        """Drop W^T when no token count's choice is a sparse GEMV (built to time them; rebuilt on need)."""
        if self._sparse and not capturing() \
                and not any(c["path"] in ("sparse", "sparse_v1") for c in self.paths.values()):
            self._sparse = None

    def candidates(self, x: torch.Tensor) -> list[dict]:
        m, n, k = x.shape[0], self.n, x.shape[1]
        out = []
        if self.cut is not None:
            sw = self.sparse_weight
            if sw is not None:
                int8 = sw["wt"].dtype == torch.int8
                out += [dict(path="sparse", **c) for c in gemv_sparse.candidates(m, n, k, int8, x.device)]
                if m <= OLD_SPARSE_TOKENS:
                    out.append(dict(path="sparse_v1"))
            if self.family == "dense":
                out.append(dict(path="masked_cublas"))
        if self.quant is not None:
            out.append(dict(path="quant"))  # QuantPaths tunes its own kernels for this token count
        if self.pinned is not None:
            out = [c for c in out if (c["path"] in ("quant", "masked_cublas")) == (self.pinned == "masked")] or out
        return out

    @property
    def n(self) -> int:
        if self.family == "dense":
            return self.dense.shape[0]
        return self.tensors["q"].shape[0]

    def launch(self, x: torch.Tensor, cfg: dict) -> torch.Tensor:
        path = cfg["path"]
        if path == "quant":
            return self.quant(x)
        if path == "masked_cublas":
            return dense_linear(x, self.dense)  # cuBLAS or our GEMV on the masked input, as dense runs
        sw = self.sparse_weight
        zero = self._zero(x)  # the input is masked already: keep exactly its non-zeros
        if path == "sparse_v1":
            return sparse_gemv(x, zero, sw["wt"], sw.get("scale"))
        return gemv_sparse.launch(x, zero, sw, {k: v for k, v in cfg.items() if k != "path"})

    def _zero(self, x: torch.Tensor) -> torch.Tensor:
        if self._zeros is None or self._zeros.device != x.device:
            self._zeros = torch.zeros(MAX_TOKENS, device=x.device, dtype=torch.float32)
        return self._zeros[:x.shape[0]]

    # ---- a call ---------------------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        rows = x.reshape(-1, x.shape[-1])
        m = rows.shape[0]
        first = self.layers[0]
        sparse = self.cut is not None and not (first.dense_multi_token and x.shape[-2] > 1)
        if m > MAX_TOKENS or (not sparse and self.quant is None):
            return None  # prefill, or a dense bf16 input: the reference path's cuBLAS is the right tool
        if sparse:
            rows = self._masked(rows, x)
        rows = rows if rows.is_contiguous() else rows.contiguous()
        if not sparse:
            y = self.quant(rows)
            self.chosen[m] = self.quant.chosen.get(m, "quant")
        else:
            key = ("linear_kernel", PROBE_VERSION, self.family, self.cut.kind, self.n, rows.shape[1], self.dtype,
                   self.quant.signature if self.quant is not None else None, self.pinned, m)
            cfg = remembered(key)
            if cfg is None:
                probe = rows if capturing() else independent_rows(rows)
                cfg = tuned(key, self.candidates(probe), lambda c: self.launch(probe, c))
            y = self.launch(rows, cfg)
            self.chosen[m] = cfg["path"] if cfg["path"] != "quant" else self.quant.chosen.get(m, "quant")
            if self.paths.get(m) is not cfg:
                self.paths[m] = cfg
                self._prune()
        return y.reshape(*x.shape[:-1], -1)

    def _masked(self, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The sparsified input, counted once per layer: as the fused kernel that produced `x` handed it
        over, or masked here in one launch (`mask_rows`); a layer reading the same input after another
        (q/k/v outside the fused step) reuses it from the shared input cache and counts its own."""
        from workbench.kernels.decode_ops import mask_rows
        cache = self.layers[0].input_cache
        if cache is not None and cache.matches(x, (self.cut, PREMASKED)):
            return rows
        if cache is not None and cache.matches(x, (self.cut, MASKED_HERE)):
            xs = cache.output
            for layer in self.layers:
                if layer.track_stats:
                    layer.nonzero_seen += (xs != 0).sum()
                    layer.entries_seen += xs.numel()
            return xs
        xs = mask_rows(rows, self.cut, [(l.nonzero_seen, l.entries_seen) for l in self.layers if l.track_stats])
        if cache is not None:
            cache.store(x, (self.cut, MASKED_HERE), xs, None)
        return xs

    def describe(self) -> str:
        """The candidate paths, and which one the tuner kept at each token count seen so far."""
        paths = []
        if self.cut is not None and (self.family == "dense" or (self.family == "int8" and self.tensors["scale"].dim() == 1)):
            paths.append("gemv_sparse" + ("+int8" if self.family == "int8" else ""))
        if self.cut is not None and self.family == "dense":
            paths.append("masked_cublas")
        if self.family in ("int8", "int4"):
            paths.append(self._quant.describe() if self._quant is not None else f"{self.family} GEMVs")
        if self.joined and not self.chosen:
            return "in a joined kernel"
        chosen = " ".join(f"{m}:{p}" for m, p in sorted(self.chosen.items()))
        return "|".join(paths) + (f" [{chosen}]" if chosen else "")


def independent_rows(rows: torch.Tensor) -> torch.Tensor:
    """What the tuner times a sparse layer on: for one token the input itself; for a batch, random rows
    that each keep their own inputs at the batch's density. The cost of a sparse kernel at M tokens is the
    union of their kept inputs, and the batch a layer first sees (a graph's warm-up, one token repeated)
    has the union of one token, which made the sparse kernel look fastest where real batches read nearly
    every row (`experiments/activation_sparsity/batch_union.py`: 98.6% of the bytes at 8 tokens)."""
    if rows.shape[0] == 1:
        return rows
    density = (rows != 0).float().mean().clamp(min=0.05)  # on the device: no sync
    keep = torch.rand(rows.shape, device=rows.device) < density
    return (torch.randn(rows.shape, device=rows.device) * keep).to(rows.dtype)


def say_fallback(layer, why: str) -> None:
    """One log line per (setting, reason): this layer's decode runs the exact reference path."""
    say_once(("fallback", str(layer.setting), why), "no GPU kernel for %s (%s): %s keeps the exact reference path",
             layer.setting, why, layer.fqn or "a layer")


def plan(layer) -> LinearKernel | None:
    """The kernel for `layer` (a WorkbenchLinear whose weights are on CUDA), or None for the reference path.

    Asked of the layer's typed entries: its sparsifier's `Cut` (None: no scalar cut, so no sparse
    kernel) and its stored format's `kernel_family` and spec; never of names or tensor ranks."""
    if not kernels_enabled():
        return None
    sparsifier, store = layer.sparsifier, layer.store
    cut = sparsifier.cut if sparsifier is not None else None
    if sparsifier is not None and cut is None:
        say_fallback(layer, "a sparsity rule with per-channel thresholds has no kernel")
        return None
    family = "dense" if store is None else store.fmt.kernel_family
    if family == "dense":  # the model's weight, or a cast store (a merged LoRA's weight)
        w = layer.base.weight if store is None else store.tensors["q"]
        if cut is None:
            return None  # dense bf16: cuBLAS is already at the bound
        if w.dtype not in (torch.bfloat16, torch.float16):
            say_fallback(layer, f"sparse kernels take bf16/fp16 weights, not {w.dtype}")
            return None
        return LinearKernel([layer], cut, "dense", dense=w, dtype=w.dtype)
    if store.compute_dtype not in (torch.bfloat16, torch.float16) or family not in ("int8", "int4"):
        say_fallback(layer, f"format {store.fmt.name} with {store.compute_dtype} activations has no GPU kernel")
        return None
    return LinearKernel([layer], cut, family, tensors=store.tensors, dtype=store.compute_dtype)


def kernel_forward(layer, x: torch.Tensor) -> torch.Tensor | None:
    """y for `x` through the layer's kernel, or None when the reference path should serve."""
    if layer.kernel is None:
        layer.kernel = plan(layer) or False
    if layer.kernel is False:
        return None
    return layer.kernel(x)


def describe(layer) -> str:
    k = layer.kernel if layer.kernel is not None else plan(layer)
    return k.describe() if k else "reference"
