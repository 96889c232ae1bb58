"""Measured facts about a (possibly transformed) model: parameters, bytes by format, achieved sparsity.

Bytes are counted from the tensors the compute path actually holds (packed data and scales included),
each storage once (tied embeddings are not counted twice). Original weights kept only as the reference
for live tuning are reported on their own line, `reference_bytes`.
"""
from __future__ import annotations

from collections import defaultdict

from torch import nn

from workbench.roles import linear_modules


def _dtype_name(t) -> str:
    return str(t.dtype).replace("torch.", "")


def weight_accounting(model: nn.Module) -> dict:
    seen: set[int] = set()
    by_format: dict[str, int] = defaultdict(int)
    modules = []
    reference_bytes = 0
    bias_params = 0
    zeros_by_role: dict[str, float] = defaultdict(float)
    entries_by_role: dict[str, float] = defaultdict(float)
    for fqn, module, role in linear_modules(model):
        wrapped = getattr(module, "is_workbench_linear", False)
        base = module.base if wrapped else module
        w = base.weight
        fmt = module.setting.weights.label if wrapped and not module.setting.weights.is_identity else _dtype_name(w)
        nbytes = module.compute_weight_bytes() if wrapped else w.numel() * w.element_size()
        if wrapped and module.store is not None and w.device.type != "meta":
            reference_bytes += w.numel() * w.element_size()
        first_time = w.data_ptr() not in seen or w.device.type == "meta"
        seen.add(w.data_ptr())
        if first_time:
            by_format[fmt] += nbytes
        if base.bias is not None and base.bias.data_ptr() not in seen:
            seen.add(base.bias.data_ptr())
            bias_params += base.bias.numel()
            by_format[_dtype_name(base.bias)] += base.bias.numel() * base.bias.element_size()
        entry = {"fqn": fqn, "role": role, "format": fmt, "params": w.numel(), "weight_bytes": nbytes}
        if wrapped:
            sp = module.setting.sparsity
            entry.update(sparsity_rule=sp.rule, sparsity_target=sp.target, achieved_sparsity=module.achieved_sparsity)
            zeros_by_role[role or "other"] += float(module.zeros_seen)
            entries_by_role[role or "other"] += float(module.entries_seen)
        modules.append(entry)
    params = 0
    for p in model.parameters():  # embeddings, norms, fused experts: everything not a linear layer
        params += p.numel() if p.data_ptr() not in seen else 0
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            by_format[_dtype_name(p)] += p.numel() * p.element_size()
    total_params = params + bias_params + sum(m["params"] for m in modules)
    total_params -= _tied_duplicates(model)
    return {
        "parameters": total_params,
        "weight_bytes": sum(by_format.values()),
        "weight_bytes_by_format": dict(sorted(by_format.items())),
        "fp32_bytes": total_params * 4,
        "bf16_bytes": total_params * 2,
        "reference_bytes": reference_bytes,
        "achieved_sparsity": _sparsity_summary(zeros_by_role, entries_by_role),
        "modules": modules,
    }


def _tied_duplicates(model: nn.Module) -> int:
    """Parameters counted twice because a linear layer (lm_head) shares its weight with another."""
    counts: dict[int, list[int]] = defaultdict(list)
    for _, module, _ in linear_modules(model):
        base = module.base if getattr(module, "is_workbench_linear", False) else module
        counts[base.weight.data_ptr()].append(base.weight.numel())
    return sum(sum(v[1:]) for v in counts.values())


def _sparsity_summary(zeros: dict, entries: dict) -> dict | None:
    """Achieved sparsity overall and per role, weighted by the number of input entries seen."""
    total = sum(entries.values())
    if not total:
        return None
    return {"overall": sum(zeros.values()) / total,
            "by_role": {r: zeros[r] / entries[r] for r in sorted(entries) if entries[r]}}
