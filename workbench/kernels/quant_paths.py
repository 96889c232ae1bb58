"""Every kernel that can multiply one packed weight at decode (1-64 tokens), and the tuner's pick per size.

    paths = QuantPaths(store.tensors, "int8", torch.bfloat16)
    y = paths(x)          # x (M, K), M <= 64: the fastest exact kernel for this shape and M

Candidates, all computing x @ dequantize(W).T in float32 accumulation from the same stored weight:

    format              | ours                                   | peers
    --------------------+----------------------------------------+-------------------------------
    int8, row scales    | gemv_int8 (no repack), quant_gemv      | gemlite A16W8
    int8, b x b blocks  | quant_gemv                             | -
    int4, groups of g   | gemv_int4 (repacked copy), quant_gemv  | tinygemm (bf16), gemlite A16Wn

Each (shape, M) is timed once, inside CUDA graphs as the decode step runs (`tuning.tuned`), over every
candidate's launch configs. A peer is first checked against our kernel on the tuning input and left out,
with one log line, if it differs by more than `PEER_TOLERANCE` (relative): gemlite's int4 at one token
differs by 2-3e-2 on the H200, our kernels by < 3e-3.
"""
from __future__ import annotations

import torch

from workbench.kernels import gemv_int4, gemv_int8
from workbench.kernels.peers import gemlite_layer, say_once, tinygemm, tinygemm_pack
from workbench.kernels.quant_gemv import launch_candidates, quant_gemv
from workbench.kernels.tuning import remembered, tuned

MAX_TOKENS = 64  # beyond this (prefill) the reference path's cuBLAS on the dequantized weight serves
PEER_TOLERANCE = 1e-2


class QuantPaths:
    """The candidate kernels for one packed weight (`tensors` of an int8 or int4 `PackedWeight`)."""

    def __init__(self, tensors: dict, family: str, dtype: torch.dtype, peers: bool = True):
        self.tensors, self.family, self.dtype = tensors, family, dtype
        q, scale = tensors["q"], tensors["scale"]
        self.n = q.shape[0]
        self.k = q.shape[1] * (2 if family == "int4" else 1)
        self.group = 0 if scale.dim() == 1 else self.k // scale.shape[1]
        self.asym = "min" in tensors
        self.w8 = gemv_int8.pack(tensors) if family == "int8" and scale.dim() == 1 else None
        self.w4 = gemv_int4.pack(tensors) if family == "int4" and self.group in gemv_int4.GROUPS \
            and self.k % self.group == 0 else None
        self.tiny = tinygemm_pack(tensors) if peers and family == "int4" and dtype == torch.bfloat16 else None
        self.gemlite = gemlite_layer(tensors, family, dtype) if peers else None
        self.rejected: set = set()  # (peer, M) pairs that failed the check
        self.chosen: dict[int, str] = {}  # token count -> the implementation the tuner kept

    @property
    def signature(self) -> tuple:
        return (self.family, self.n, self.k, self.group, self.asym, self.dtype, self.w4 is not None,
                self.tiny is not None, self.gemlite is not None)

    def _own_candidates(self, x: torch.Tensor) -> list[dict]:
        """Our kernels' launch configs for x's token count, the best-guess default first."""
        m = x.shape[0]
        out = []
        if self.w8 is not None:
            out += [dict(impl="w8", **c) for c in gemv_int8.candidates(m, self.n, self.k, x.device)]
        if self.w4 is not None:
            out += [dict(impl="w4", **c) for c in gemv_int4.candidates(m, self.n, self.k, self.group, x.device,
                                                                         asym=self.asym)]
        bits = 8 if self.family == "int8" else 4
        return out + [dict(impl="quant", **c) for c in launch_candidates(m, self.n, self.k, bits, x.device)]

    def candidates(self, x: torch.Tensor) -> list[dict]:
        m = x.shape[0]
        out = self._own_candidates(x)
        for peer in ("tiny", "gemlite"):
            if getattr(self, peer) is not None and (peer, m) not in self.rejected and self._peer_agrees(peer, x):
                out.append(dict(impl=peer))
        return out

    def launch(self, x: torch.Tensor, cfg: dict) -> torch.Tensor:
        impl = cfg["impl"]
        if impl == "w8":
            return gemv_int8.launch(x, self.w8, cfg)
        if impl == "w4":
            return gemv_int4.launch(x, self.w4, cfg)
        if impl == "tiny":
            return tinygemm(x, self.tiny)
        if impl == "gemlite":
            return self.gemlite(x)
        return quant_gemv(x, self.tensors, {k: v for k, v in cfg.items() if k != "impl"})

    def choice(self, x: torch.Tensor) -> dict:
        """The launch config the tuner keeps for x's token count (timed on first use)."""
        key = ("quant_paths", *self.signature, x.shape[0])
        cfg = remembered(key)
        if cfg is None:
            cfg = tuned(key, self.candidates(x), lambda c: self.launch(x, c))
        self.chosen[x.shape[0]] = cfg["impl"]
        return cfg

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()  # a no-op for the contiguous rows the decode step hands over
        return self.launch(x, self.choice(x))

    def _peer_agrees(self, peer: str, x: torch.Tensor) -> bool:
        """True when `peer`'s output for x matches our own kernel's (else it is left out, said once)."""
        if torch.cuda.is_current_stream_capturing():
            return False  # no checks inside a capture: the warm-up tunes first
        try:
            got = self.launch(x, dict(impl=peer)).float()
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
        names = [n for n, have in (("gemv_int8", self.w8), ("gemv_int4", self.w4)) if have is not None]
        names.append("quant_gemv")
        names += [n for n, have in (("tinygemm", self.tiny), ("gemlite", self.gemlite)) if have is not None]
        return "|".join(names)


def joined_tensors(stores: list) -> dict:
    """The packed tensors of several stores of one format and input size (q|k|v, gate|up) as one weight:
    each tensor concatenated along the output rows. Every format here quantizes rows independently (row
    scales, groups along K), so the joined weight is exactly the stack of the parts."""
    names = stores[0].names
    return {name: torch.cat([s.tensors[name] for s in stores]) for name in names}
