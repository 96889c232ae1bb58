"""Measured facts about a (possibly transformed) model: parameters, bytes by format, achieved sparsity.

Bytes are counted from the tensors the compute path actually holds (packed data and scales included),
each storage once: tied embeddings and a packed table shared by an embedding and its tied lm_head are
not counted twice. Original weights kept only as the reference for live tuning are reported on their own
line, `reference_bytes`.
"""
from __future__ import annotations

from collections import defaultdict

from torch import nn

from workbench.policy import BLOCK_ROLES
from workbench.roles import embedding_modules, linear_modules


def _dtype_name(t) -> str:
    return str(t.dtype).replace("torch.", "")


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


class _Ledger:
    """Bytes by format, each storage counted once (keyed by data pointer, or by id for packed stores)."""

    def __init__(self):
        self.by_format: dict[str, int] = defaultdict(int)
        self.seen: set = set()

    def add(self, key, fmt: str, nbytes: int) -> bool:
        if key in self.seen:
            return False
        self.seen.add(key)
        self.by_format[fmt] += nbytes
        return True


def weight_accounting(model: nn.Module) -> dict:
    ledger = _Ledger()
    modules, sparsity_rows, kept_originals = [], [], {}
    for fqn, module, role in linear_modules(model):
        wrapped = getattr(module, "is_workbench_linear", False)
        base = module.base if wrapped else module
        w, store = base.weight, getattr(module, "store", None) if wrapped else None
        if store is not None:
            fmt, nbytes = module.setting.weights.label, store.nbytes
            ledger.add(("store", id(store)), fmt, nbytes)
            kept_originals[w.data_ptr()] = w
        else:
            fmt, nbytes = _dtype_name(w), _nbytes(w)
            ledger.add(w.data_ptr(), fmt, nbytes)
        if base.bias is not None:
            ledger.add(base.bias.data_ptr(), _dtype_name(base.bias), _nbytes(base.bias))
        entry = {"fqn": fqn, "role": role, "format": fmt, "params": w.numel(), "weight_bytes": nbytes}
        if wrapped:
            sp = module.setting.sparsity
            entry.update(sparsity_rule=sp.rule, sparsity_target=sp.target, achieved_sparsity=module.achieved_sparsity)
        if role in BLOCK_ROLES:
            achieved = module.achieved_sparsity if wrapped and module.sparsifier is not None else 0.0
            sparsity_rows.append((role, w.numel(), achieved, module.setting.sparsity.target if wrapped else 0.0))
        modules.append(entry)
    for fqn, module in embedding_modules(model):
        if getattr(module, "is_workbench_embedding", False):
            fmt, nbytes = module.setting.weights.label, module.store.nbytes
            ledger.add(("store", id(module.store)), fmt, nbytes)
            kept_originals[module.base.weight.data_ptr()] = module.base.weight
            modules.append({"fqn": fqn, "role": "embed", "format": fmt, "params": module.base.weight.numel(),
                            "weight_bytes": nbytes})
    counted_weights = {id(m.base.weight if getattr(m, "is_workbench_linear", False) else m.weight)
                       for _, m, _ in linear_modules(model)}
    counted_weights |= {id(m.base.weight) for _, m in embedding_modules(model)
                        if getattr(m, "is_workbench_embedding", False)}
    for p in model.parameters():  # norms, plain embeddings, fused experts: everything else
        if id(p) not in counted_weights and p.device.type != "meta":
            ledger.add(p.data_ptr(), _dtype_name(p), _nbytes(p))
    unique = {id(p): p for p in model.parameters()}  # parameters() yields a tied tensor once
    params = sum(p.numel() for p in unique.values())
    reference = sum(_nbytes(w) for ptr, w in kept_originals.items() if ptr not in ledger.seen and
                    w.device.type != "meta")
    return {
        "parameters": params,
        "weight_bytes": sum(ledger.by_format.values()),
        "weight_bytes_by_format": dict(sorted(ledger.by_format.items())),
        "fp32_bytes": params * 4,
        "bf16_bytes": params * 2,
        "reference_bytes": reference,
        "achieved_sparsity": _sparsity_summary(sparsity_rows),
        "modules": modules,
    }


def _sparsity_summary(rows: list) -> dict | None:
    """Model-wide achieved sparsity: the fraction of block-linear weight columns whose input was zero,
    weighted by parameters (as TEAL counts it), overall and per role; dense modules count as 0.

    None when no sparsifying module has seen a token yet (nothing measured).
    """
    active = [r for r in rows if r[3] > 0]
    if not active or any(a is None for _, _, a, _ in active):
        return None
    total = sum(p for _, p, _, _ in rows)
    by_role: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for role, p, a, _ in rows:
        by_role[role][0] += a * p
        by_role[role][1] += p
    overall = sum(a * p for _, p, a, _ in rows) / total
    target = sum(t * p for _, p, _, t in rows) / total
    return {"overall": overall, "target": target, "drift": overall - target,
            "by_role": {r: v[0] / v[1] for r, v in sorted(by_role.items())}}
