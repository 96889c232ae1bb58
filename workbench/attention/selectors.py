"""Attention key selectors: which past keys each query keeps, as boolean masks over exact scores.

Every selector gets a `SelectionContext` for a chunk of queries and returns keep (B, H, c, Tk); the
backend adds the always-kept keys (the current token and the first `sinks` valid keys) and intersects
with the causal/padding mask. Budgets are a key count (int) or a fraction of each query's valid context
(float in (0, 1]); selectors without a budget use 25% of the context.

* ``topk``          exact per-query, per-head top-k by full score (the quality reference for selection).
* ``indexer``       DeepSeek-V3.2-style lightning indexer, training-free: ReLU of low-precision (bf16)
                    q·k over each query's `dims` largest-|q| dimensions (SparQ's trick: per query, so
                    causal), weighted per head by the query's norm and summed over heads; one top-k shared
                    by all heads (as DSA shares it across heads).
* ``block``         Quest: pages of `page` keys; a page's score is the upper bound of q·k from its per-
                    dimension key min/max; the top pages within the budget are kept whole.
* ``window``        StreamingLLM: `sinks` first tokens plus the most recent `window` keys.
* ``hierarchical``  local / regional / global tiers: the last `local` keys, the best regional blocks of
                    `regional` keys by q·(mean key), and the sinks as the global tier.
* ``dense``         every causal key.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch

from workbench.errors import PolicyError
from workbench.policy import ATTENTION_SELECTORS, Attention, parse_budget

DEFAULT_FRACTION = 0.25
DEFAULT_SINKS = 4


@dataclass
class SelectionContext:
    spec: Attention
    q: torch.Tensor  # (B, H, c, D)
    k: torch.Tensor  # (B, H, Tk, D)
    scores: torch.Tensor  # (B, H, c, Tk), -inf where not valid
    valid: torch.Tensor  # (B, H, c, Tk) causal and not padding

    def param(self, name: str, default):
        return self.spec.params.get(name, default)

    def key_positions(self) -> torch.Tensor:
        return torch.arange(self.k.shape[2], device=self.k.device)

    def query_positions(self) -> torch.Tensor:
        """(B, H, c, 1): each query's own key index = the last key it may see."""
        return (self.valid * self.key_positions()).amax(-1, keepdim=True)

    def budget(self) -> torch.Tensor:
        """(B, H, c, 1) keys each query may keep, clamped to [1, valid keys]."""
        n_valid = self.valid.sum(-1, keepdim=True)
        b = self.spec.budget if self.spec.budget is not None else DEFAULT_FRACTION
        k = torch.full_like(n_valid, b) if isinstance(b, int) else torch.ceil(n_valid * b).long()
        return torch.minimum(k.clamp(min=1), n_valid.clamp(min=1))

    def always_kept(self) -> torch.Tensor:
        """The current token, the first `sinks` valid keys, and everything where the budget covers it all."""
        sinks = self.param("sinks", DEFAULT_SINKS)
        current = self.key_positions() == self.query_positions()
        kept = current | (self.valid & (self.valid.cumsum(-1) <= sinks))
        if self.spec.budget is not None:  # a budget at least the context is dense attention, exactly
            kept = kept | (self.valid & (self.budget() >= self.valid.sum(-1, keepdim=True)))
        return kept


def top_per_row(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """keep (.., T): the `counts` (.., 1) highest scores per row (ties at the cut may add a few)."""
    k_max = int(counts.max().item())
    values = scores.topk(min(k_max, scores.shape[-1]), dim=-1).values
    cut = values.gather(-1, (counts - 1).clamp(min=0, max=values.shape[-1] - 1))
    return (scores >= cut) & (scores > float("-inf"))


def select_topk(ctx: SelectionContext) -> torch.Tensor:
    return top_per_row(ctx.scores, ctx.budget())


def select_indexer(ctx: SelectionContext) -> torch.Tensor:
    d = ctx.q.shape[-1]
    dims = min(int(ctx.param("dims", max(1, d // 2))), d)
    q = ctx.q.float()
    cut = q.abs().topk(dims, dim=-1).values[..., -1:]  # each query's own top-|q| dimensions
    q_low = torch.where(q.abs() >= cut, q, 0.0).to(torch.bfloat16)  # the indexer runs in low precision
    k_low = ctx.k.to(torch.bfloat16)
    per_head = torch.relu(torch.matmul(q_low, k_low.transpose(-1, -2)).float())  # (B, H, c, Tk)
    weights = ctx.q.float().norm(dim=-1, keepdim=True)  # (B, H, c, 1): per-head weight of each query
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
    index = (weights * per_head).sum(dim=1, keepdim=True)  # (B, 1, c, Tk): shared by all heads
    any_valid = ctx.valid.any(dim=1, keepdim=True)
    index = index.masked_fill(~any_valid, float("-inf"))
    return top_per_row(index, ctx.budget()[:, :1]).expand_as(ctx.valid)


def _pages(x: torch.Tensor, size: int, fill: float) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, T/size, size, D), the tail padded with `fill`."""
    b, h, t, d = x.shape
    pad = (-t) % size
    if pad:
        x = torch.cat([x, x.new_full((b, h, pad, d), fill)], dim=2)
    return x.reshape(b, h, -1, size, d)


def _pages_any(valid: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, c, Tk) key mask -> (B, H, c, P): does each page hold any valid key."""
    pad = (-valid.shape[-1]) % size
    if pad:
        valid = torch.cat([valid, valid.new_zeros(*valid.shape[:-1], pad)], dim=-1)
    return valid.reshape(*valid.shape[:-1], -1, size).any(-1)


def _expand_pages(page_keep: torch.Tensor, size: int, tk: int) -> torch.Tensor:
    """(B, H, c, P) page mask -> (B, H, c, Tk) key mask."""
    return page_keep.repeat_interleave(size, dim=-1)[..., :tk]


def select_block(ctx: SelectionContext) -> torch.Tensor:
    size = int(ctx.param("page", 16))
    tk = ctx.k.shape[2]
    kf = ctx.k.float()
    kmin = _pages(kf, size, float("inf")).amin(dim=3)  # (B, H, P, D)
    kmax = _pages(kf, size, float("-inf")).amax(dim=3)
    qf = ctx.q.float()
    # max(q*kmin, q*kmax) summed over D = relu(q) . kmax + min(q, 0) . kmin: two matmuls
    bound = qf.clamp(min=0) @ kmax.transpose(-1, -2) + qf.clamp(max=0) @ kmin.transpose(-1, -2)
    page_valid = _pages_any(ctx.valid, size)  # (B, H, c, P)
    current_page = ctx.query_positions() // size  # (B, H, c, 1)
    pages = torch.arange(bound.shape[-1], device=bound.device)
    bound = bound.masked_fill(~page_valid, float("-inf")).masked_fill(pages == current_page, float("inf"))
    n_pages = torch.ceil(ctx.budget() / size).long()
    return _expand_pages(top_per_row(bound, n_pages), size, tk)


def select_window(ctx: SelectionContext) -> torch.Tensor:
    window = int(ctx.param("window", 256))
    return (ctx.query_positions() - ctx.key_positions()) < window


def select_hierarchical(ctx: SelectionContext) -> torch.Tensor:
    local, regional = int(ctx.param("local", 32)), int(ctx.param("regional", 128))
    sinks = int(ctx.param("sinks", DEFAULT_SINKS))
    tk = ctx.k.shape[2]
    near = (ctx.query_positions() - ctx.key_positions()) < local
    blocks = _pages(ctx.k.float(), regional, 0.0)  # (B, H, Nb, R, D)
    counts = torch.full((tk,), 1.0, device=ctx.k.device)
    n_in = torch.cat([counts, counts.new_zeros((-tk) % regional)]).reshape(-1, regional).sum(-1)  # (Nb,)
    pooled = blocks.sum(dim=3) / n_in[:, None]  # mean key per block
    score = ctx.q.float() @ pooled.transpose(-1, -2)  # (B, H, c, Nb)
    block_valid = _pages_any(ctx.valid, regional)
    # the query's own block is pooled over future keys too: always keep it, never rank it (causality)
    own = torch.arange(score.shape[-1], device=score.device) == ctx.query_positions() // regional
    score = score.masked_fill(~block_valid | own, float("-inf"))
    # the rest of the budget buys whole regional blocks (rounded up); the query's own block is one of them
    n_blocks = (torch.ceil((ctx.budget() - local - sinks).clamp(min=0) / regional).long() - 1).clamp(min=0)
    chosen = own & block_valid
    if int(n_blocks.max().item()) > 0:
        chosen = chosen | (top_per_row(score, n_blocks.clamp(min=1)) & (n_blocks > 0))
    return near | _expand_pages(chosen, regional, tk)


# ---- registry entries ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SelectorEntry:
    name: str
    params: dict  # allowed parameter -> minimum value
    takes_budget: bool = True
    parse_arg: Callable[[str], Attention] | None = None
    doc: str = ""

    def validate(self, spec: Attention) -> None:
        unknown = set(spec.params) - set(self.params)
        if unknown:
            raise PolicyError(f"attention selector {self.name!r} takes no parameter(s) {', '.join(sorted(unknown))}; "
                              f"allowed: {', '.join(sorted(self.params)) or 'none'}")
        for key, value in spec.params.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < self.params[key]:
                raise PolicyError(f"attention {self.name} {key} must be an integer >= {self.params[key]}, got {value!r}")
        if spec.budget is not None and not self.takes_budget:
            raise PolicyError(f"attention selector {self.name!r} takes no budget; its sizes are its parameters")

    def parse(self, arg: str) -> Attention:
        if self.parse_arg is not None:
            return self.parse_arg(arg)
        return Attention(self.name, budget=parse_budget(arg, f"{self.name}:{arg}"))


def _parse_window(arg: str) -> Attention:
    m = re.fullmatch(r"(\d+)\+(\d+)", arg)
    if not m:
        raise PolicyError(f"cannot parse 'window:{arg}': expected window:SINKS+WINDOW, e.g. window:4+256")
    return Attention("window", params={"sinks": int(m.group(1)), "window": int(m.group(2))})


def _parse_hierarchical(arg: str) -> Attention:
    m = re.fullmatch(r"(\d+)/(\d+)(?:,([0-9.]+))?", arg)
    if not m:
        raise PolicyError(f"cannot parse 'hierarchical:{arg}': expected hierarchical:LOCAL/REGIONAL[,BUDGET], "
                          "e.g. hierarchical:32/128 or hierarchical:32/128,0.25")
    budget = parse_budget(m.group(3), f"hierarchical:{arg}") if m.group(3) else None
    return Attention("hierarchical", budget=budget, params={"local": int(m.group(1)), "regional": int(m.group(2))})


SELECTOR_FNS: dict[str, Callable[[SelectionContext], torch.Tensor]] = {
    "topk": select_topk, "indexer": select_indexer, "block": select_block, "window": select_window,
    "hierarchical": select_hierarchical,
}
ATTENTION_SELECTORS.register("dense", SelectorEntry("dense", {}, takes_budget=False,
                                                    doc="every causal key: the model's own attention"))
ATTENTION_SELECTORS.register("topk", SelectorEntry("topk", {"sinks": 0}, doc="exact per-query top-k"))
ATTENTION_SELECTORS.register("indexer", SelectorEntry("indexer", {"sinks": 0, "dims": 1},
                                                      doc="lightning-indexer-style cheap scores, shared top-k"))
ATTENTION_SELECTORS.register("block", SelectorEntry("block", {"sinks": 0, "page": 1},
                                                    doc="Quest page selection by key min/max bounds"))
ATTENTION_SELECTORS.register("window", SelectorEntry("window", {"sinks": 0, "window": 1}, takes_budget=False,
                                                     parse_arg=_parse_window, doc="sinks + recent window"))
ATTENTION_SELECTORS.register("hierarchical", SelectorEntry(
    "hierarchical", {"sinks": 0, "local": 1, "regional": 1}, parse_arg=_parse_hierarchical,
    doc="local window + best regional blocks + sinks"))


def kept_fraction_bound(spec: Attention, context: int) -> int:
    """Keys a selector keeps at most for a query with `context` valid keys (for sizing and checks)."""
    if spec.selector == "window":
        return min(context, spec.params.get("window", 256) + spec.params.get("sinks", DEFAULT_SINKS))
    b = spec.budget if spec.budget is not None else DEFAULT_FRACTION
    return min(context, b if isinstance(b, int) else math.ceil(b * context))
