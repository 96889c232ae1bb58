"""Activation-aware scaling (AWQ's idea) in our formats: scale the input channels that carry large
activations up before rounding, and fold the inverse into the RMSNorm that feeds the layers.

For a norm feeding linears W_1..W_n (q|k|v after input_layernorm, gate|up after post_attention_layernorm;
Gemma 3: after pre_feedforward_layernorm), y_i = W_i (g * x) = (W_i diag(s)) ((g / s) * x): the same
function for any positive s. Rounding W_i diag(s)
instead of W_i gives the channels with large s finer steps relative to their weights, so the error that
reaches the output, sum_i tr(E_i H E_i^T) with E_i = W_i - Q(W_i diag(s)) diag(1 / s) and H the layer
input's calibration Hessian (`formats.hessians`, sum of x x^T), shrinks where the activations are large.
As in AWQ, s = a^alpha (a: each channel's RMS activation, from diag(H)), normalised to a geometric mean of
1, with alpha searched on a grid for the least of that error; alpha = 0 is plain rounding, so the search
is never worse than RTN on its own measure. The packed weights are the format's own (every kernel, the
byte accounting and export stay as they are); the norm weight becomes g / s (`Engine` keeps the original
for the reference and for other policies). Gemma's RMSNorm multiplies by (1 + w), so there w becomes
(1 + w) / s - 1.

Not here: AWQ's folds into a preceding linear (o's scale into v, down's into up); an `awq` o or down
rounds to nearest. A norm's consumers must all be `awq`, or none.
"""
from __future__ import annotations

import torch

from workbench.errors import PolicyError

ALPHAS = tuple(i / 20 for i in range(20))  # AWQ's grid
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
LLAMA_NORMS = (("input_layernorm", QKV), ("post_attention_layernorm", GATE_UP))
# model_type -> (the norms and the linears each feeds, the norm's offset: it scales by offset + w)
NORM_GROUPS = {"gemma3_text": ((("input_layernorm", QKV), ("pre_feedforward_layernorm", GATE_UP)), 1.0)}
FOLDABLE = "the Llama family and Gemma 3"


def norm_groups(model_type: str) -> tuple[tuple, float] | None:
    """(norm groups, offset) for a model type awq folds into, None for the others."""
    from workbench.runtime.decoder import LLAMA_FAMILY
    return (LLAMA_NORMS, 0.0) if model_type in LLAMA_FAMILY else NORM_GROUPS.get(model_type)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(E H E^T), E = w - w_hat: the squared output error summed over the calibration tokens."""
    e = (w - w_hat).double()
    return float(((e @ hessian.double()) * e).sum())


def search_scale(layers: list[tuple[torch.Tensor, object]], hessian: torch.Tensor,
                 quantize) -> tuple[torch.Tensor, dict]:
    """The input-channel scale s (K,) for `layers` [(weight (N, K), spec), ...] sharing one input whose
    Hessian is `hessian`; `quantize(w, spec)` -> the dequantized weight. Returns s and the search's facts."""
    act = torch.diagonal(hessian).double().clamp_min(1e-20).sqrt()
    best = None
    for alpha in ALPHAS:
        s = act.pow(alpha)
        s = (s / (s.max() * s.min()).sqrt()).float()
        err = sum(output_error(w.float(), quantize(w.float() * s, spec) / s, hessian) for w, spec in layers)
        if best is None or err < best[1]:
            best = (s, err, alpha)
        if alpha == 0:
            rtn = err
    s, err, alpha = best
    return s, {"alpha": alpha, "error": err, "rtn_error": rtn}


def groups(model, policy) -> list[tuple[str, list[str]]]:
    """(norm fqn, its consumers' fqns) for every norm whose consumers the policy quantizes with `awq`;
    a norm with awq and non-awq consumers is refused in one line."""
    from workbench.roles import linear_modules
    settings = {fqn: policy.setting_for(fqn, role) for fqn, _, role in linear_modules(model)}
    awq_fqns = [fqn for fqn, setting in settings.items() if setting.weights.method == "awq"]
    known = norm_groups(model.config.model_type)
    if awq_fqns and known is None:
        raise PolicyError(f"awq folds its scales into RMSNorm weights of {FOLDABLE}, not "
                          f"{model.config.model_type!r}")
    out = []
    for i, _ in enumerate(getattr(getattr(model, "model", None), "layers", [])):
        for norm, parts in (known[0] if known else ()):
            fqns = [f"model.layers.{i}.{p}" for p in parts]
            awq = [f for f in fqns if f in settings and settings[f].weights.method == "awq"]
            if not awq:
                continue
            if len(awq) != len(fqns):
                others = ", ".join(f.rsplit(".", 1)[-1] for f in fqns if f not in awq)
                raise PolicyError(f"{awq[0]}: awq scales the input of model.layers.{i}.{norm}, which also feeds "
                                  f"{others}: give them awq too")
            out.append((f"model.layers.{i}.{norm}", fqns))
    return out


class NormFolds:
    """The norms an engine's `awq` layers fold their scales into: the scales searched per group (kept, so a
    policy seen before folds again at once), the original norm weights while folded, and the facts."""

    def __init__(self):
        self.scales: dict[tuple, torch.Tensor] = {}  # (norm fqn, its consumers' formats) -> s
        self.folded: dict[str, torch.Tensor] = {}  # norm fqn -> s, as the model now holds it
        self.originals: dict[str, torch.Tensor] = {}  # norm fqn -> its weight before any fold
        self.facts: dict[str, dict] = {}  # norm fqn -> {alpha, error, rtn_error}

    def plan(self, model, policy, hessians: dict | None) -> dict[str, torch.Tensor]:
        """{consumer fqn: s} for `policy`'s awq groups; a group seen before reuses its scale, a new one is
        searched on `hessians` (collected with the norms unfolded)."""
        from workbench.formats.packed import WEIGHT_FORMATS
        from workbench.transforms import base_of, plan
        fitted = {step.fqn: step.setting.weights for step in plan(model, policy)}  # after any format fallback
        out = {}
        for norm, fqns in groups(model, policy):
            specs = [fitted[f] for f in fqns]
            key = (norm, tuple(repr(spec) for spec in specs))
            if key not in self.scales:
                entry = (hessians or {}).get(fqns[0])
                if entry is None:
                    raise PolicyError(f"{fqns[0]}: awq needs calibration inputs (a Hessian) and got none")
                layers = [(base_of(model.get_submodule(f)).weight.detach(), spec) for f, spec in zip(fqns, specs)]
                s, facts = search_scale(layers, entry[0],
                                        lambda w, spec: WEIGHT_FORMATS.get(spec.format).quantize(w, spec).dequantize())
                self.scales[key], self.facts[norm] = s, facts
            out.update({f: self.scales[key] for f in fqns})
            out[norm] = self.scales[key]
        return out

    def fold(self, model, scales: dict[str, torch.Tensor]) -> None:
        """Norm weights g -> g / s for the norms in `scales` (the others as loaded); (1 + g) / s - 1 where
        the norm scales by 1 + g (Gemma)."""
        self.restore(model)
        offset = (norm_groups(model.config.model_type) or ((), 0.0))[1]
        for fqn, s in scales.items():
            if not fqn.endswith("layernorm"):
                continue
            weight = model.get_submodule(fqn).weight
            original = self.originals.setdefault(fqn, weight.detach().clone())
            with torch.no_grad():  # in place: graphs hold the weight's storage
                weight.copy_(((offset + original.double()) / s.double() - offset).to(original))
            self.folded[fqn] = s

    def restore(self, model) -> dict[str, torch.Tensor]:
        """Every folded norm back to its original weight; returns what was folded."""
        was = dict(self.folded)
        with torch.no_grad():
            for fqn in was:
                model.get_submodule(fqn).weight.copy_(self.originals[fqn])
        self.folded.clear()
        return was
