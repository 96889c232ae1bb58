"""Mixed-precision policies: which weight format each module gets.

* `variance_policy`  the seed's rule: a layer whose weight variance is above a threshold keeps fp16,
                     the rest int8 (a baseline).
* `llamacpp_policy`  llama.cpp's Q4_K_M recipe in our formats: attn_v and ffn_down get more bits in the
                     first and last eighth of the layers and every third layer between (its
                     `use_more_bits`), everything else the base 4-bit format.
* `auto_policy`      given a budget (bytes or bits per weight), choose each unit's format to minimise the
                     predicted KLD (the sum of measured single-unit sensitivities): start everything at its
                     cheapest format and repeatedly buy the upgrade with the best KLD saved per byte, on
                     each unit's lower convex hull (where the greedy choice is optimal for the relaxation).
"""
from __future__ import annotations

import dataclasses
import heapq
import re
from dataclasses import dataclass

import torch

from workbench.errors import PolicyError
from workbench.policy import BLOCK_ROLES, Policy, Rule, Setting, parse_precision
from workbench.roles import layer_index, linear_modules


def _rules(assignment: dict[str, str]) -> tuple[Rule, ...]:
    """Group modules by format into one regex rule per format (readable, compact JSON)."""
    by_format: dict[str, list[str]] = {}
    for fqn, fmt in assignment.items():
        by_format.setdefault(fmt, []).append(fqn)
    return tuple(Rule("re:^(" + "|".join(re.escape(f) for f in sorted(fqns)) + ")$",
                      Setting(weights=parse_precision(fmt))) for fmt, fqns in sorted(by_format.items()))


def _block_linears(model) -> list[tuple[str, torch.Tensor, str]]:
    return [(fqn, m.base.weight if hasattr(m, "base") else m.weight, role)
            for fqn, m, role in linear_modules(model) if role in BLOCK_ROLES]


def variance_policy(model, threshold: float | None = None, high: str = "fp16", low: str = "int8") -> Policy:
    """Per decoder layer: weight variance above `threshold` (default: the median layer's) keeps `high`."""
    layers: dict[int, list[torch.Tensor]] = {}
    for fqn, w, _ in _block_linears(model):
        layers.setdefault(layer_index(fqn), []).append(w.detach().float().reshape(-1))
    variance = {i: torch.cat(ws).var().item() for i, ws in layers.items()}
    cut = threshold if threshold is not None else float(torch.tensor(list(variance.values())).median())
    assignment = {fqn: high if variance[layer_index(fqn)] > cut else low for fqn, _, _ in _block_linears(model)}
    return Policy(rules=_rules(assignment), name=f"variance({high}/{low})")


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's rule for the layers whose attn_v / ffn_down get a larger type."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def llamacpp_policy(model, base: str = "int4-g32", more: str = "int8") -> Policy:
    """A Q4_K_M-like mixture: v and down projections get `more` bits where llama.cpp gives them."""
    n_layers = model.config.num_hidden_layers
    assignment = {}
    for fqn, _, role in _block_linears(model):
        boosted = role in ("v", "kv_b", "down") and use_more_bits(layer_index(fqn), n_layers)
        assignment[fqn] = more if boosted else base
    return Policy(rules=_rules(assignment), name=f"llamacpp({base}+{more})")


def _convex_hull(options: list[tuple[int, float, str]]) -> list[tuple[int, float, str]]:
    """Lower-left convex hull of (bytes, kld) options, cheapest first, kld strictly falling."""
    pts = []
    for b, k, f in sorted(options):
        if pts and k >= pts[-1][1]:
            continue  # costs more, no better
        while len(pts) >= 2:
            (b1, k1, _), (b2, k2, _) = pts[-2], pts[-1]
            if (k2 - k1) * (b - b1) >= (k - k1) * (b2 - b1):  # the middle point is not on the hull
                pts.pop()
            else:
                break
        pts.append((b, k, f))
    return pts


@dataclass(frozen=True)
class Allocation:
    assignment: dict  # module fqn -> format
    bytes: int
    predicted_kld: float
    bits_per_weight: float

    def policy(self) -> Policy:
        return Policy(rules=_rules(self.assignment), name=f"auto({self.bits_per_weight:.2f}bpw)")


def auto_policy(sensitivity, budget_bytes: int | None = None, budget_bits: float | None = None) -> Policy:
    """The format per module that minimises predicted KLD within the budget (see `allocate`)."""
    return allocate(sensitivity, budget_bytes, budget_bits).policy()


def allocate(sensitivity, budget_bytes: int | None = None, budget_bits: float | None = None) -> Allocation:
    """The assignment of formats to units that minimises summed KLD within the budget (greedy on hulls).

    The budget covers the scanned units (block linears); `budget_bits` is per weight of those units.
    """
    total_params = sum(sensitivity.params.values())
    if (budget_bytes is None) == (budget_bits is None):
        raise PolicyError("auto precision needs exactly one budget: bytes or bits per weight")
    budget = int(budget_bytes if budget_bytes is not None else budget_bits * total_params / 8)
    hulls = {u: _convex_hull([(sensitivity.bytes[u][f], k, f) for f, k in sensitivity.kld[u].items()])
             for u in sensitivity.kld}
    choice = {u: 0 for u in hulls}
    spent = sum(h[0][0] for h in hulls.values())
    if spent > budget:
        raise PolicyError(f"budget {budget} bytes ({8 * budget / total_params:.2f} bits per weight) is below the "
                          f"smallest possible size, {spent} bytes ({8 * spent / total_params:.2f} bits per weight)")
    heap = []  # (-kld saved per byte, unit)

    def push(u):
        i = choice[u]
        if i + 1 < len(hulls[u]):
            (b0, k0, _), (b1, k1, _) = hulls[u][i], hulls[u][i + 1]
            heapq.heappush(heap, (-(k0 - k1) / (b1 - b0), u))

    for u in hulls:
        push(u)
    while heap:
        _, u = heapq.heappop(heap)
        i = choice[u]
        extra = hulls[u][i + 1][0] - hulls[u][i][0]
        if spent + extra > budget:
            continue  # this upgrade does not fit; a cheaper one elsewhere still may
        spent += extra
        choice[u] = i + 1
        push(u)
    assignment = {fqn: hulls[u][choice[u]][2] for u in hulls for fqn in sensitivity.units[u]}
    predicted = sum(hulls[u][choice[u]][1] for u in hulls)
    return Allocation(assignment, spent, predicted, 8 * spent / total_params)


FUSED_PARTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # one fused layer each in vLLM


def fused(sensitivity):
    """`sensitivity` with the parts of each of vLLM's fused layers (q|k|v, gate|up of one decoder layer)
    merged into one unit: its KLD per format the sum of the parts' (the additive model `allocate` already
    assumes), its bytes the sum, and only the formats every part was scanned in. An allocation on it gives
    the parts one format, as vLLM needs to load a compressed-tensors export."""
    owner = {}
    for u, fqns in sensitivity.units.items():
        if len(fqns) != 1:
            continue
        parent, _, leaf = fqns[0].rpartition(".")
        for parts in FUSED_PARTS:
            if leaf in parts:
                owner[u] = f"{parent}.{'|'.join(parts)}"
    groups: dict[str, list[str]] = {}
    for u in sensitivity.units:
        groups.setdefault(owner.get(u, u), []).append(u)
    units, params, kld, nbytes = {}, {}, {}, {}
    for g, members in groups.items():
        formats = set.intersection(*(set(sensitivity.kld[u]) for u in members))
        units[g] = [f for u in members for f in sensitivity.units[u]]
        params[g] = sum(sensitivity.params[u] for u in members)
        kld[g] = {f: sum(sensitivity.kld[u][f] for u in members) for f in formats}
        nbytes[g] = {f: sum(sensitivity.bytes[u][f] for u in members) for f in formats}
    return dataclasses.replace(sensitivity, units=units, params=params, kld=kld, bytes=nbytes)


def with_auto_precision(base: Policy, sensitivity, budget_bytes: int | None = None,
                        budget_bits: float | None = None, name: str | None = None,
                        keep_fused: bool = False) -> Policy:
    """`base` with each block linear's weight format chosen from the measured `sensitivity` to fit the
    budget, everything else of `base` (sparsity, attention, its own rules first) kept: the one way the
    CLI (`--precision auto`), the PrecisionTuner and notebook 04 compose `auto` with a policy.

    With `keep_fused` the parts of vLLM's fused layers share one format (`fused`).

    >>> with_auto_precision(Policy.uniform(0.4), scan, budget_bits=5.0)  # doctest: +SKIP
    """
    auto = auto_policy(fused(sensitivity) if keep_fused else sensitivity, budget_bytes, budget_bits)
    rules = tuple(dataclasses.replace(r, setting=dataclasses.replace(base.default, weights=r.setting.weights))
                  for r in auto.rules)
    label = name or (auto.name if base.is_identity else f"{auto.name}+{base.name}")
    return dataclasses.replace(base, rules=base.rules + rules, name=label)
