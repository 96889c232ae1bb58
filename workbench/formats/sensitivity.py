"""Quantization sensitivity: the KL divergence when only one module (or one layer) is quantized.

For every unit and format, quantize that unit alone and measure the mean KL divergence of next-token
distributions from the unmodified model on calibration text (the reference logits are computed once).
HAWQ-style allocation then treats these as additive costs: the `auto` policy (mixed_precision.py) spends a
memory budget where it buys the most KLD back.

The result is a small JSON artifact cached per model fingerprint, formats, granularity and token count.
"""
from __future__ import annotations

import hashlib
import json
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

from workbench.corpus import load_text, token_windows
from workbench.errors import InputError, PolicyError
from workbench.evaluate import compare_logits
from workbench.models import cache_dir
from workbench.policy import BLOCK_ROLES, WEIGHT_FORMATS, Policy, Rule, Setting, parse_precision
from workbench.progress import progress as bar
from workbench.roles import layer_index, linear_modules
from workbench.sparsity.calibration import model_fingerprint

SENSITIVITY_VERSION = 1
DEFAULT_FORMATS = ("int4-g32", "int4-g64", "int8", "fp8", "bf16")


@dataclass
class Sensitivity:
    """kld[unit][format] and bytes[unit][format]; `units` maps a unit to its module names."""

    granularity: str
    formats: list[str]
    units: dict[str, list[str]]
    params: dict[str, int]
    kld: dict[str, dict[str, float]]
    bytes: dict[str, dict[str, int]]
    meta: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"version": SENSITIVITY_VERSION, **self.__dict__}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Sensitivity":
        data = json.loads(text)
        if data.pop("version", None) != SENSITIVITY_VERSION:
            raise InputError("sensitivity artifact has another version; rescan")
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Sensitivity":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"sensitivity artifact not found: {path}")
        return cls.from_json(path.read_text())

    def layer_table(self) -> tuple[list[int], list[str], list[list[float]]]:
        """(layers, formats, summed KLD per layer and format): the per-layer view for figures."""
        per: dict[int, dict[str, float]] = {}
        for unit, fmts in self.kld.items():
            layer = layer_index(self.units[unit][0])
            row = per.setdefault(layer, {f: 0.0 for f in self.formats})
            for f, v in fmts.items():
                row[f] += v
        layers = sorted(per)
        return layers, list(self.formats), [[per[l][f] for f in self.formats] for l in layers]


def scan_units(model, granularity: str) -> dict[str, list[str]]:
    """Block linears grouped by unit: one per module, or one per decoder layer."""
    if granularity not in ("module", "layer"):
        raise InputError(f"granularity must be 'module' or 'layer', got {granularity!r}")
    units: dict[str, list[str]] = {}
    for fqn, _, role in linear_modules(model):
        if role not in BLOCK_ROLES:
            continue
        key = fqn if granularity == "module" else f"layer{layer_index(fqn)}"
        units.setdefault(key, []).append(fqn)
    return units


def unit_policy(fqns: list[str], precision: str) -> Policy:
    """Only these modules in this format; everything else untouched."""
    pattern = "re:^(" + "|".join(re.escape(f) for f in fqns) + ")$"
    return Policy(rules=(Rule(pattern, Setting(weights=parse_precision(precision))),), name=f"only:{precision}")


def scan(engine, formats=DEFAULT_FORMATS, granularity: str = "module", tokens: int = 256,
         progress: bool = True) -> Sensitivity:
    """KLD of quantizing each unit alone in each format, on `tokens` calibration tokens.

    >>> from workbench import Engine
    >>> s = scan(Engine.from_pretrained("synthetic:tiny-llama"), ["int8"], "layer", 32, progress=False)
    >>> sorted(s.kld)
    ['layer0', 'layer1']
    """
    for f in formats:
        parse_precision(f)  # fail on a bad name before any work
    text, description = load_text(None, "calibration")
    ids = token_windows(engine.tokenizer, text, min(tokens + 1, engine.max_positions), tokens)[0][None]
    ids = ids.to(engine.device)  # (1, T)
    saved = engine.policy
    units = scan_units(engine.model, granularity)
    shapes = {fqn: tuple(m.weight.shape) if hasattr(m, "weight") else tuple(m.base.weight.shape)
              for fqn, m, _ in linear_modules(engine.model)}
    reference = engine.reference_logits(ids)[0, :-1]
    kld: dict[str, dict[str, float]] = {u: {} for u in units}
    sizes: dict[str, dict[str, int]] = {u: {} for u in units}
    jobs = [(u, f) for u in units for f in formats]
    try:
        for unit, fmt in bar(jobs, desc=f"sensitivity ({granularity})", unit="scan", enabled=progress):
            spec = parse_precision(fmt)
            entry = WEIGHT_FORMATS.get(spec.format)
            try:
                for f in units[unit]:
                    entry.check_shape(spec, shapes[f], f)
            except PolicyError:  # a format that does not fit this unit's shape is simply not a candidate
                continue
            engine.reconfigure(unit_policy(units[unit], fmt))
            logits = engine.forward(ids)[0, :-1]
            kld[unit][fmt] = compare_logits(reference, logits, ids[0, 1:])["kld"].mean().item()
            sizes[unit][fmt] = sum(entry.expected_bytes(spec, shapes[f]) for f in units[unit])
    finally:
        engine.reconfigure(saved)
    params = {u: sum(shapes[f][0] * shapes[f][1] for f in fq) for u, fq in units.items()}
    meta = {"model": engine.name, "fingerprint": model_fingerprint(engine.model), "tokens": tokens,
            "corpus": description, "python": platform.python_version()}
    return Sensitivity(granularity, list(formats), units, params, kld, sizes, meta)


def cached_scan(engine, formats=DEFAULT_FORMATS, granularity: str = "module", tokens: int = 256,
                progress: bool = True) -> Sensitivity:
    """`scan`, computed once per (model, formats, granularity, tokens) and kept in the cache."""
    key = hashlib.sha256(json.dumps([model_fingerprint(engine.model), list(formats), granularity, tokens])
                         .encode()).hexdigest()[:16]
    path = cache_dir() / "sensitivity" / f"{key}.json"
    if path.is_file():
        return Sensitivity.load(path)
    result = scan(engine, formats, granularity, tokens, progress)
    result.save(path)
    return result
