"""apply_policy / unwrap: the one place that swaps modules.

`apply_policy(model, policy)` walks the model once. Every linear layer whose setting is not the
identity is replaced by a `WorkbenchLinear` that keeps the original as `.base`; attention layers whose
selector is not dense get a workbench attention backend (registered through transformers'
AttentionInterface, never by patching `forward`). Re-applying another policy rewraps only what changed and
reuses the kept originals, so switching policies live needs no weight reload. `unwrap(model)` restores the
exact original modules.

The plan is validated for the whole model before any module is touched, so a bad policy (say, a group
size that does not divide a layer's width) leaves the model as it was.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any, Iterator

from torch import nn

from workbench.attention.install import dense_attention, set_layer_selectors
from workbench.errors import PolicyError
from workbench.layers import SharedInputCache, WorkbenchEmbedding, WorkbenchLinear, check_setting
from workbench.policy import QUANT_METHODS, WEIGHT_FORMATS, Policy, Setting
from workbench.roles import attention_modules, embedding_modules, linear_modules

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedModule:
    fqn: str
    role: str | None
    setting: Setting
    fallback: str | None = None  # why a model-wide format was replaced by one this layer can take


def plan(model: nn.Module, policy: Policy) -> list[PlannedModule]:
    """Each linear layer's setting under `policy`; raises (model untouched) if any is invalid for its shape."""
    planned = []
    for fqn, module, role in linear_modules(model):
        setting, model_wide = policy.lookup(fqn, role)
        if setting.linear_is_identity:
            planned.append(PlannedModule(fqn, role, setting))
            continue
        planned.append(_fitted(_base(module), fqn, role, setting, model_wide))
    for fqn, module in embedding_modules(model):
        setting, model_wide = policy.lookup(fqn, "embed")
        if not setting.sparsity.is_identity:
            raise PolicyError(f"{fqn} is an embedding table: it takes a weight format, not activation sparsity")
        if setting.weights.is_identity:
            planned.append(PlannedModule(fqn, "embed", setting))
            continue
        step = _fitted(_base(module), fqn, "embed", setting, model_wide)
        if QUANT_METHODS.get(step.setting.weights.method).needs_hessian:  # a lookup has no inputs to weigh
            rtn = dataclasses.replace(step.setting, weights=dataclasses.replace(step.setting.weights, method="rtn",
                                                                                 calibrate_sparse=False))
            step = PlannedModule(fqn, "embed", rtn, f"{step.setting.weights.label} -> {rtn.weights.label} "
                                                    "(an embedding table has no inputs to calibrate on)")
        planned.append(step)
    _check_attention(model, policy)
    _check_experts(model, policy)
    return planned


def _fitted(base: nn.Module, fqn: str, role: str | None, setting: Setting, model_wide: bool) -> PlannedModule:
    """The setting if this layer's shape takes it; for a model-wide setting, else the nearest format the
    layer does take (the weight format's own `fallback`); an explicit rule that does not fit is refused."""
    embedding = role == "embed"
    try:
        check_setting(base, setting, fqn, embedding)
        return PlannedModule(fqn, role, setting)
    except PolicyError as refusal:
        entry = WEIGHT_FORMATS.get(setting.weights.format)
        fit = entry.fallback(setting.weights, tuple(base.weight.shape), embedding) if model_wide else None
        if fit is None:
            raise
        if fit.format == setting.weights.format or fit.format in ("int4", "int8"):
            try:  # the nearest format keeps the rounding method where it can (int4-g128-gptq -> int4-g64-gptq)
                fit = dataclasses.replace(fit, method=setting.weights.method)
            except PolicyError:
                pass
        fitted = dataclasses.replace(setting, weights=fit)
        check_setting(base, fitted, fqn, embedding)
        reason = str(refusal).split(": ", 1)[-1]
        return PlannedModule(fqn, role, fitted, f"{setting.weights.label} -> {fit.label} ({reason})")


def _check_experts(model: nn.Module, policy: Policy) -> None:
    """Routed experts (one module of 3-D tensors per layer in transformers 5, role `experts`) take no weight
    format or sparsity yet: a rule that names them is refused in one line rather than ignored, on a model
    with experts and on one without (where it matches nothing)."""
    experts = [fqn for fqn, _ in model.named_modules() if fqn.endswith(".mlp.experts")]
    for rule in policy.rules:
        if rule.setting.linear_is_identity:
            continue
        if rule.match.startswith("role:"):
            named = "experts" in {r.strip() for r in rule.match[5:].split(",")}
        else:
            named = re.search(r"(?<!shared_)experts", rule.match) is not None
        hits = [fqn for fqn in experts if rule.matches(fqn, "experts")]
        if hits:
            where = f"{hits[0]} and {len(hits) - 1} more" if len(hits) > 1 else hits[0]
            raise PolicyError(f"rule {rule.match!r}: routed experts ({where}) take no weight format or sparsity "
                              "yet; their shared experts and the other layers do")
        if named and not experts:
            raise PolicyError(f"rule {rule.match!r}: {model.config.model_type!r} has no routed experts")
        if named and not any(rule.matches(fqn, role) for fqn, _, role in linear_modules(model)):
            raise PolicyError(f"rule {rule.match!r} matches no module: the routed experts of a layer are one "
                              f"module ({experts[0]}), not one per expert")


def _check_attention(model: nn.Module, policy: Policy) -> None:
    """Selector sizes must fit the model's context (checked before anything is swapped)."""
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    for fqn, _ in attention_modules(model):
        spec = policy.setting_for(fqn, "attention").attention
        if spec.selector == "window" and context:
            sinks, window = spec.params.get("sinks", 4), spec.params.get("window", 256)
            if sinks + window > context:
                raise PolicyError(f"window {sinks}+{window} does not fit the model's {context}-token context")


def apply_policy(model: nn.Module, policy: Policy, calibration: Any = None,
                 store_cache: dict | None = None, hessians: dict | None = None,
                 built: dict | None = None, scales: dict | None = None) -> nn.Module:
    """Apply `policy` in place and return the model.

    `store_cache` (a dict the caller keeps) remembers packed weights by (original weight, format), so
    switching back to a format seen before costs no requantization (what a live slider needs).
    `built` (another dict the caller keeps) remembers whole wrappers by (layer, setting, calibration): a
    layer switched back to a setting it had gets the very same module again, with its GPU kernels and
    their weight layouts, so that graphs captured for it stay valid. `model.workbench_built_new` says how
    many wrappers this call had to build (0: every layer is a module seen before, or the original).
    `hessians` ({fqn: (H, tokens)}, `formats.hessians`) serve the layers of a calibrated method (gptq).
    `scales` ({fqn: s}, `formats.awq`) are the input-channel scales of `awq` layers.

    >>> from workbench.models import load
    >>> model = load("synthetic:tiny-llama").model
    >>> _ = apply_policy(model, Policy.identity())
    """
    steps = plan(model, policy)
    cache = SharedInputCache()
    # (weight storage, format) -> packed weight: tied tables quantize once, revisited formats not at all
    stores: dict[tuple, nn.Module] = store_cache if store_cache is not None else {}
    swaps, fresh = [], 0  # build every wrapper first: a failure part-way leaves the model untouched
    for step in sorted(steps, key=lambda s: s.role != "embed"):
        module = model.get_submodule(step.fqn)
        cal = _calibration_for(calibration, step.fqn)
        scale = (scales or {}).get(step.fqn)
        key = (step.fqn, repr(step.setting), scale_digest(scale))  # Setting holds a dict: its repr is the key
        known = (built or {}).get(key)
        if known is not None and known[0] is cal and known[1].base is _base(module):
            replacement = known[1]
        else:
            replacement = _replacement(module, step, cal, stores, (hessians or {}).get(step.fqn), scale)
            fresh += _is_wrapper(replacement) and replacement is not module
        if built is not None and _is_wrapper(replacement):
            built[key] = (cal, replacement)
        swaps.append((step.fqn, module, replacement))
    for fqn, module, replacement in swaps:
        if replacement is not module:
            model.set_submodule(fqn, replacement)
        if getattr(replacement, "is_workbench_linear", False):
            replacement.input_cache = cache
    _apply_attention(model, policy)
    model.workbench_built_new = fresh
    model.workbench_policy = policy
    model.workbench_fallbacks = {step.fqn: step.fallback for step in steps if step.fallback}
    if model.workbench_fallbacks:
        log.warning("%d layer(s) cannot take %s and use the nearest format that fits: %s",
                    len(model.workbench_fallbacks), policy.name,
                    "; ".join(f"{k}: {v}" for k, v in list(model.workbench_fallbacks.items())[:3])
                    + (" ..." if len(model.workbench_fallbacks) > 3 else ""))
    return model


def _replacement(module: nn.Module, step: PlannedModule, cal: Any, stores: dict, hessian=None,
                 scale=None) -> nn.Module:
    """The module `step` asks for: the original, the current wrapper (unchanged setting), or a new one."""
    base = _base(module)
    identity = step.setting.weights.is_identity if step.role == "embed" else step.setting.linear_is_identity
    if identity:
        return base
    if (_is_wrapper(module) and module.setting == step.setting and getattr(module, "calibration", None) is cal
            and getattr(module, "awq_digest", None) == scale_digest(scale)):
        return module
    key = store_key(base, step.setting) + ((scale_digest(scale),) if scale is not None else ())
    shared = stores.get(key) if not step.setting.weights.is_identity else None
    method = QUANT_METHODS.get(step.setting.weights.method)
    if shared is None and method.name == "awq" and step.role != "embed":
        shared = method.quantize(base.weight, step.setting.weights, name=step.fqn, scale=scale)
    elif shared is None and method.needs_hessian and step.role != "embed":
        shared = method.quantize(base.weight, step.setting.weights, (hessian or (None,))[0], name=step.fqn)
    if step.role == "embed":
        wrapper = WorkbenchEmbedding(base, step.setting, step.fqn, store=shared)
    else:
        wrapper = WorkbenchLinear.from_linear(base, step.setting, step.fqn, step.role, cal, store=shared)
    wrapper.awq_digest = scale_digest(scale)  # None unless the weight was rounded with awq input scales
    if wrapper.store is not None and base.weight.device.type != "meta":
        stores[key] = wrapper.store
    return wrapper


def scale_digest(scale) -> str | None:
    """A short fingerprint of an awq input scale (packed weights and wrappers are remembered under it)."""
    if scale is None:
        return None
    return hashlib.sha256(scale.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


def calibrated_as_run(setting) -> bool:
    """True when the layer's calibrated method sees its inputs as the policy runs them: the layer is also
    sparsified and `weights.calibrate_sparse` is set, so its Hessian comes from the sparsified inputs and
    the rounding error is weighed on the inputs that survive the cut."""
    return (QUANT_METHODS.get(setting.weights.method).needs_hessian and not setting.sparsity.is_identity
            and setting.weights.calibrate_sparse)


def store_key(base, setting) -> tuple:
    """The key a packed weight is remembered under: (weight storage, format), and the sparsity too when the
    weight was calibrated on sparsified inputs (another cut gives another weight)."""
    key = (base.weight.data_ptr(), setting.weights)
    return key + (repr(setting.sparsity),) if calibrated_as_run(setting) else key  # Sparsity holds a dict


def _is_wrapper(module: nn.Module) -> bool:
    return getattr(module, "is_workbench_linear", False) or getattr(module, "is_workbench_embedding", False)


def unwrap(model: nn.Module) -> nn.Module:
    """Restore every original module and attention implementation (exact: the originals were kept)."""
    for fqn, module, _ in list(linear_modules(model)):
        if getattr(module, "is_workbench_linear", False):
            model.set_submodule(fqn, module.base)
    for fqn, module in list(embedding_modules(model)):
        if getattr(module, "is_workbench_embedding", False):
            model.set_submodule(fqn, module.base)
    _apply_attention(model, Policy.identity())
    for attr in ("workbench_policy", "workbench_fallbacks", "workbench_built_new"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def wrappers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for fqn, module, _ in linear_modules(model):
        if getattr(module, "is_workbench_linear", False):
            yield fqn, module


@contextlib.contextmanager
def bypassed(model: nn.Module):
    """Run the unmodified model for the duration: wrappers call their `.base`, attention goes dense.

    The reference for every quality number; needs the originals kept (`keep_reference=True`).
    """
    active = [m for _, m in wrappers(model)] + [m for _, m in embedding_modules(model) if _is_wrapper(m)]
    for m in active:
        m.bypass = True
    try:
        with dense_attention(model):
            yield model
    finally:
        for m in active:
            m.bypass = False


def _base(module: nn.Module) -> nn.Module:
    return module.base if _is_wrapper(module) else module


base_of = _base  # the original module behind a wrapper (or the module itself)


def _calibration_for(calibration: Any, fqn: str) -> Any:
    if calibration is None:
        return None
    return calibration.for_module(fqn)


def _apply_attention(model: nn.Module, policy: Policy) -> None:
    selectors = {}
    for fqn, module in attention_modules(model):
        setting = policy.setting_for(fqn, "attention")
        selectors[module.layer_idx] = setting.attention
    set_layer_selectors(model, selectors)
