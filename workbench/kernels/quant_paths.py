"""Every kernel that can multiply one packed weight at decode (1-64 tokens), and the tuner's pick per size.

    paths = QuantPaths(store.tensors, "int8", torch.bfloat16)
    y = paths(x)          # x (M, K), M <= 64: the fastest exact kernel for this shape and M

Candidates, all computing x @ dequantize(W).T in float32 accumulation from the same stored weight:

    format              | ours                                   | peers
    --------------------+----------------------------------------+-------------------------------
    int8, row scales    | gemv_int8 (no repack), quant_gemv,     | gemlite A16W8
                        | gemv_int8_mma (CUDA C++, tensor cores) |
    int8, b x b blocks  | quant_gemv                             | -
    int4, groups of g   | gemv_int4 (repacked copy), quant_gemv, | tinygemm (bf16), gemlite A16Wn
                        | gemv_int4_mma (CUDA C++, tensor cores) |

Each (shape, M) is timed once, inside CUDA graphs as the decode step runs (`tuning.tuned`), over every
candidate's launch configs. Each implementation's re-laid-out copy of the weight is built for the tuning
and kept only while a token count's choice uses it: an int4 layer would otherwise hold four copies
(ours in two layouts, tinygemm's, gemlite's) for one it runs. A peer, and our CUDA C++ kernels (compiled
on the machine they run on), are first checked against our Triton kernel on the tuning input and left
out, with one log line, if they differ by more than `PEER_TOLERANCE` (relative): gemlite's int4 at one
token differs by 2-3e-2 on the H200, our kernels by < 3e-3.
"""
from __future__ import annotations

import torch

from workbench.kernels import gemv_int4, gemv_int4_mma, gemv_int8, gemv_int8_mma, mma_cuda
from workbench.kernels.peers import gemlite_fits, gemlite_layer, say_once, tinygemm, tinygemm_fits, tinygemm_pack
from workbench.kernels.quant_gemv import launch_candidates, quant_gemv
from workbench.kernels.tuning import capturing, remembered, saved, tuned

MAX_TOKENS = 64  # beyond this (prefill) the reference path's cuBLAS on the dequantized weight serves
PEER_TOLERANCE = 1e-2
CUDA_CPP = ("w8mma", "w4mma")  # our CUDA C++ kernels (`mma_cuda`)
_UNBUILT = object()


class QuantPaths:
    """The candidate kernels for one packed weight (`tensors` of an int8 or int4 `PackedWeight`)."""

    def __init__(self, tensors: dict, family: str, dtype: torch.dtype, peers: bool = True):
        self.tensors, self.family, self.dtype = tensors, family, dtype
        q, scale = tensors["q"], tensors["scale"]
        self.n = q.shape[0]
        self.k = q.shape[1] * (2 if family == "int4" else 1)
        self.group = 0 if scale.dim() == 1 else self.k // scale.shape[1]
        self.asym = "min" in tensors
        self.offered = {  # implementation -> whether it can take this weight (its layout is built on use)
            "w8": family == "int8" and scale.dim() == 1,
            "w4": family == "int4" and self.group in gemv_int4.GROUPS and self.k % self.group == 0,
            "w4mma": family == "int4" and gemv_int4_mma.fits(tensors) and mma_cuda.available(q.device),
            "w8mma": family == "int8" and gemv_int8_mma.fits(tensors) and mma_cuda.available(q.device),
            "tiny": peers and family == "int4" and dtype == torch.bfloat16 and tinygemm_fits(tensors),
            "gemlite": peers and gemlite_fits(tensors, family, dtype)}
        self.layouts: dict[str, object] = {}  # implementation -> its copy of the weight, while one is chosen
        self.rejected: set = set()  # (peer, M) pairs that failed the check
        self.chosen: dict[int, str] = {}  # token count -> the implementation the tuner kept
        self.configs: dict[int, dict] = {}  # token count -> its launch config

    @property
    def signature(self) -> tuple:
        return (self.family, self.n, self.k, self.group, self.asym, self.dtype, self.offered["w4"],
                self.offered["tiny"], self.offered["gemlite"]) + tuple(i for i in CUDA_CPP if self.offered[i])

    def layout(self, cfg: dict):
        """The weight in `cfg`'s implementation's layout, built on first use (never inside a capture: the
        tuner and the graphs run every config once eagerly first); None where a peer refused it."""
        impl = cfg["impl"]
        have = self.layouts.get(impl, _UNBUILT)
        pruned = impl == "w4" and have is not _UNBUILT and ("qq" if cfg.get("wa") else "qp") not in have
        if have is _UNBUILT or pruned:  # a peer's None (it refused the weight) is not built again
            if capturing():
                raise RuntimeError(f"QuantPaths: the {impl} layout must be built before a CUDA graph capture")
            have = {"w8": lambda: gemv_int8.pack(self.tensors), "w4": lambda: gemv_int4.pack(self.tensors),
                    "w4mma": lambda: gemv_int4_mma.pack(self.tensors), "w8mma": lambda: gemv_int8_mma.pack(self.tensors),
                    "tiny": lambda: tinygemm_pack(self.tensors),
                    "gemlite": lambda: gemlite_layer(self.tensors, self.family, self.dtype)}[impl]()
            self.layouts[impl] = have
        return have

    def _prune(self) -> None:
        """Drop every layout that no token count's choice uses (the tuner built them all to time them)."""
        used = [c for c in self.configs.values() if c["impl"] != "quant"]
        for impl in [i for i in self.layouts if i not in {c["impl"] for c in used}]:
            del self.layouts[impl]
        w4 = self.layouts.get("w4")
        if w4:
            wa = {bool(c.get("wa")) for c in used if c["impl"] == "w4"}
            for key, needed in (("qq", True), ("qp", False)):
                if needed not in wa:
                    w4.pop(key, None)

    def _own_candidates(self, x: torch.Tensor) -> list[dict]:
        """Our kernels' launch configs for x's token count, the best-guess default first."""
        m = x.shape[0]
        out = []
        if self.offered["w8"]:
            out += [dict(impl="w8", **c) for c in gemv_int8.candidates(m, self.n, self.k, x.device)]
        if self.offered["w4"]:
            out += [dict(impl="w4", **c) for c in gemv_int4.candidates(m, self.n, self.k, self.group, x.device,
                                                                         asym=self.asym)]
        bits = 8 if self.family == "int8" else 4
        return out + [dict(impl="quant", **c) for c in launch_candidates(m, self.n, self.k, bits, x.device)]

    def candidates(self, x: torch.Tensor) -> list[dict]:
        m = x.shape[0]
        out = self._own_candidates(x)
        for impl in CUDA_CPP:  # our CUDA C++ kernels are checked like peers: they are compiled on this machine
            if self.offered[impl] and (impl, m) not in self.rejected:
                mma = [dict(impl=impl, **c) for c in (
                    gemv_int4_mma.candidates(m, self.n, self.k, self.group) if impl == "w4mma"
                    else gemv_int8_mma.candidates(m, self.n, self.k))]
                if self._agrees(mma[0], x):
                    out += mma
        for peer in ("tiny", "gemlite"):
            if self.offered[peer] and (peer, m) not in self.rejected and self._agrees(dict(impl=peer), x):
                out.append(dict(impl=peer))
        return out

    def launch(self, x: torch.Tensor, cfg: dict) -> torch.Tensor:
        impl = cfg["impl"]
        if impl == "quant":
            return quant_gemv(x, self.tensors, {k: v for k, v in cfg.items() if k != "impl"})
        layout = self.layout(cfg)
        if impl == "w8":
            return gemv_int8.launch(x, layout, cfg)
        if impl == "w4":
            return gemv_int4.launch(x, layout, cfg)
        if impl == "w4mma":
            return gemv_int4_mma.launch(x, layout, cfg)
        if impl == "w8mma":
            return gemv_int8_mma.launch(x, layout, cfg)
        if impl == "tiny":
            return tinygemm(x, layout)
        return layout(x)  # gemlite's layer is a callable

    def choice(self, x: torch.Tensor) -> dict:
        """The launch config the tuner keeps for x's token count (timed on first use)."""
        m = x.shape[0]
        key = ("quant_paths", *self.signature, m)
        cfg = remembered(key)
        if cfg is None:
            cands = self.candidates(x)
            # A choice saved before our CUDA C++ kernels existed (its key lacks them) is timed against them
            # alone: a fresh machine then compiles one Triton config per shape, not all of them.
            before = saved(key[:10] + key[-1:]) if len(key) > 11 else None
            if before in cands:
                cands = [before] + [c for c in cands if c["impl"] in CUDA_CPP]
            cfg = tuned(key, cands, lambda c: self.launch(x, c))
        if self.configs.get(m) is not cfg:
            self.chosen[m], self.configs[m] = cfg["impl"], cfg
            if not capturing():
                if cfg["impl"] != "quant":
                    self.layout(cfg)  # first, so that pruning keeps it
                self._prune()
        return cfg

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()  # a no-op for the contiguous rows the decode step hands over
        return self.launch(x, self.choice(x))

    def _agrees(self, cfg: dict, x: torch.Tensor) -> bool:
        """True when the output for x of `cfg` (a peer, or our CUDA C++ kernel) matches our Triton
        kernel's (else it is left out, said once)."""
        peer = cfg["impl"]
        if capturing():
            return False  # no checks inside a capture: the warm-up tunes first
        try:
            if self.layout(cfg) is None:
                raise ValueError("it has no layout for this weight")
            got = self.launch(x, cfg).float()
        except Exception as e:  # noqa: BLE001 - a peer failing on a shape is skipped, not fatal
            self.rejected.add((peer, x.shape[0]))
            say_once((peer, self.signature, x.shape[0]), "%s skipped for %s %dx%d at %d tokens: %s", peer,
                     self.family, self.n, self.k, x.shape[0], f"{type(e).__name__}: {str(e)[:160]}")
            return False
        ours = self._own_candidates(x)[0]
        want = self.launch(x, ours).float()
        err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
        if not err < PEER_TOLERANCE:
            self.rejected.add((peer, x.shape[0]))
            say_once((peer, self.signature, x.shape[0]), "%s skipped for %s %dx%d at %d tokens: differs by %.1e "
                     "(relative) from our kernel", peer, self.family, self.n, self.k, x.shape[0], err)
            return False
        return True

    def describe(self) -> str:
        names = [n for n, impl in (("gemv_int8", "w8"), ("gemv_int4", "w4"), ("gemv_int8_mma", "w8mma"),
                                   ("gemv_int4_mma", "w4mma")) if self.offered[impl]]
        names.append("quant_gemv")
        names += [n for n, impl in (("tinygemm", "tiny"), ("gemlite", "gemlite")) if self.offered[impl]]
        return "|".join(names)


def joined_tensors(stores: list) -> dict:
    """The packed tensors of several stores of one format and input size (q|k|v, gate|up) as one weight:
    each tensor concatenated along the output rows. Every format here quantizes rows independently (row
    scales, groups along K), so the joined weight is exactly the stack of the parts."""
    names = stores[0].names
    return {name: torch.cat([s.tensors[name] for s in stores]) for name in names}
