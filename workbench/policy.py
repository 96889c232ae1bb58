"""A policy is data: what to do to each layer, as a frozen dataclass tree that round-trips through JSON.

A `Policy` holds a default `Setting` and ordered `Rule`s; the first rule whose pattern matches a module
wins. A pattern is a glob on the module's full name (``model.layers.1*.mlp.down_proj``), a regex
(``re:layers\\.(0|29)\\.``) or a role list (``role:down,up``). A `Setting` says three things:

* `Sparsity`  which activation-sparsity rule runs on the linear's input, and its target;
* `Weights`   the weight format (and its group or block size);
* `Attention` the attention selector of a layer's attention module, and its budget.

Names are looked up in registries (`SPARSITY_RULES`, `WEIGHT_FORMATS`, `ATTENTION_SELECTORS`) that the
method modules fill in, so an unknown name fails here with the list of allowed names.

>>> p = Policy.uniform(precision="none")
>>> Policy.from_json(p.to_json()) == p
True
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from workbench.errors import PolicyError
from workbench.registry import Registry

POLICY_VERSION = 1

SPARSITY_RULES: Registry = Registry("sparsity rule")
WEIGHT_FORMATS: Registry = Registry("weight format")
ATTENTION_SELECTORS: Registry = Registry("attention selector")
QUANT_METHODS: Registry = Registry("quantization method")  # how a weight format's values are chosen

# Roles the default setting applies to. Others (lm_head, router, indexer) change only when a rule names them.
BLOCK_ROLES = frozenset({"q", "k", "v", "o", "gate", "up", "down", "q_a", "q_b", "kv_a", "kv_b"})


def _check_params(kind: str, params: Any) -> dict:
    if not isinstance(params, Mapping):
        raise PolicyError(f"{kind}.params must be an object, got {type(params).__name__}")
    return dict(params)


@dataclass(frozen=True)
class Sparsity:
    """Activation sparsity on a linear's input: `target` is the fraction of input entries zeroed."""

    rule: str = "dense"
    target: float = 0.0
    prefill: bool = False  # dense prefill by default, as TEAL does
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        entry = SPARSITY_RULES.get(self.rule)
        if isinstance(self.target, bool) or not isinstance(self.target, (int, float)):
            raise PolicyError(f"sparsity.target must be a number in [0, 1), got {self.target!r}")
        if not 0.0 <= self.target < 1.0:
            raise PolicyError(f"sparsity.target must be in [0, 1), got {self.target}")
        if self.rule == "dense" and self.target != 0:
            raise PolicyError(f"sparsity rule 'dense' takes target 0, got {self.target}; pick a sparsity rule")
        object.__setattr__(self, "params", _check_params("sparsity", self.params))
        _validate_entry(entry, self)

    @property
    def is_identity(self) -> bool:
        return self.target == 0.0


@dataclass(frozen=True)
class Weights:
    """Weight storage format; `group_size` is the int4 group or the int8 block edge where a format has one."""

    format: str = "none"
    group_size: int | None = None
    symmetric: bool = True
    method: str = "rtn"  # how the weights are rounded: QUANT_METHODS (rtn: nearest; gptq: calibrated)
    # True: a calibrated method on a sparsified layer sees its inputs after the cut (measured no better)
    calibrate_sparse: bool = False

    def __post_init__(self):
        entry = WEIGHT_FORMATS.get(self.format)
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size <= 0):
            raise PolicyError(f"weights.group_size must be a positive integer, got {self.group_size!r}")
        _validate_entry(entry, self)
        _validate_entry(QUANT_METHODS.get(self.method), self)
        if self.calibrate_sparse and not QUANT_METHODS.get(self.method).needs_hessian:
            raise PolicyError(f"calibrate_sparse goes with a calibrated method (gptq, imatrix), not {self.method}")

    @property
    def is_identity(self) -> bool:
        return self.format == "none"

    @property
    def label(self) -> str:
        """Short name as the CLI spells it: ``int4-g64``, ``int8-block64``, ``none``."""
        entry = WEIGHT_FORMATS.get(self.format)
        label = entry.label(self) if hasattr(entry, "label") else self.format
        label = label if self.method == "rtn" else f"{label}-{self.method}"
        return label + ("-sparsecal" if self.calibrate_sparse else "")


@dataclass(frozen=True)
class Attention:
    """Key selection for a layer's attention. `budget`: an int is a key count, a float in (0, 1] a fraction."""

    selector: str = "dense"
    budget: int | float | None = None
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        entry = ATTENTION_SELECTORS.get(self.selector)
        b = self.budget
        if b is not None:
            if isinstance(b, bool) or not isinstance(b, (int, float)):
                raise PolicyError(f"attention.budget must be a key count or a fraction, got {b!r}")
            if isinstance(b, int) and b <= 0:
                raise PolicyError(f"attention.budget as a key count must be >= 1, got {b}")
            if isinstance(b, float) and not 0.0 < b <= 1.0:
                raise PolicyError(f"attention.budget as a fraction must be in (0, 1], got {b}")
        object.__setattr__(self, "params", _check_params("attention", self.params))
        _validate_entry(entry, self)

    @property
    def is_identity(self) -> bool:
        return self.selector == "dense"


def _validate_entry(entry: Any, spec: Any) -> None:
    """Let the registered implementation check its own parameters (group sizes, window sizes...)."""
    validate = getattr(entry, "validate", None)
    if validate is not None:
        validate(spec)


@dataclass(frozen=True)
class Setting:
    """Everything the policy says about one module."""

    sparsity: Sparsity = field(default_factory=Sparsity)
    weights: Weights = field(default_factory=Weights)
    attention: Attention = field(default_factory=Attention)

    @property
    def is_identity(self) -> bool:
        return self.sparsity.is_identity and self.weights.is_identity and self.attention.is_identity

    @property
    def linear_is_identity(self) -> bool:
        """True when a linear layer under this setting needs no wrapper."""
        return self.sparsity.is_identity and self.weights.is_identity


@dataclass(frozen=True)
class Rule:
    """`match` selects modules by glob on the full name, ``re:REGEX`` (searched) or ``role:r1,r2``."""

    match: str
    setting: Setting

    def __post_init__(self):
        if not isinstance(self.match, str) or not self.match:
            raise PolicyError(f"rule.match must be a non-empty string, got {self.match!r}")
        if self.match.startswith("re:"):
            try:
                re.compile(self.match[3:])
            except re.error as e:
                raise PolicyError(f"rule.match {self.match!r} is not a valid regex: {e}") from None

    def matches(self, fqn: str, role: str | None) -> bool:
        if self.match.startswith("re:"):
            return re.search(self.match[3:], fqn) is not None
        if self.match.startswith("role:"):
            return role is not None and role in {r.strip() for r in self.match[5:].split(",")}
        return fnmatch.fnmatchcase(fqn, self.match)


@dataclass(frozen=True)
class Policy:
    """Default setting plus ordered rules, first match wins.

    >>> Policy.identity().setting_for("model.layers.0.mlp.down_proj", "down").is_identity
    True
    """

    default: Setting = field(default_factory=Setting)
    rules: tuple[Rule, ...] = ()
    name: str = "identity"
    calibration: str | None = None  # path of a calibration artifact (thresholds); relative to the policy file

    def __post_init__(self):
        object.__setattr__(self, "rules", tuple(self.rules))
        if self.calibration is not None and (not isinstance(self.calibration, str) or not self.calibration):
            raise PolicyError(f"policy.calibration must be a path string, got {self.calibration!r}")
        for r in self.rules:
            if not isinstance(r, Rule):
                raise PolicyError(f"policy.rules must hold Rule objects, got {type(r).__name__}")

    # ---- lookup -------------------------------------------------------------------------------------
    def setting_for(self, fqn: str, role: str | None) -> Setting:
        """The setting for one module: the first matching rule's, else the default (block roles only)."""
        return self.lookup(fqn, role)[0]

    def lookup(self, fqn: str, role: str | None) -> tuple[Setting, bool]:
        """(setting, model_wide): model-wide when it comes from the default or a `role:` rule, which a
        layer whose shape cannot take its format may replace by one that fits (as llama.cpp does per
        tensor); a rule naming modules by glob or regex is taken exactly or refused."""
        for rule in self.rules:
            if rule.matches(fqn, role):
                return rule.setting, rule.match.startswith("role:")
        if role in BLOCK_ROLES or role == "attention":
            return self.default, True
        return Setting(), True

    @property
    def is_identity(self) -> bool:
        return self.default.is_identity and all(r.setting.is_identity for r in self.rules)

    def settings(self) -> list[Setting]:
        return [self.default] + [r.setting for r in self.rules]

    def without_weights(self) -> "Policy":
        """The same policy with every weight format dropped (sparsity and attention kept)."""
        rules = tuple(dataclasses.replace(r, setting=dataclasses.replace(r.setting, weights=Weights()))
                      for r in self.rules)
        return dataclasses.replace(self, default=dataclasses.replace(self.default, weights=Weights()), rules=rules,
                                   name=f"{self.name} (sparsity only)")

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def identity(cls) -> "Policy":
        return cls()

    @classmethod
    def uniform(cls, sparsity: float = 0.0, rule: str | None = None, precision: str = "none",
                attention: str = "dense", name: str | None = None, head: str | None = None) -> "Policy":
        """One setting for every block linear and attention layer, from CLI-style shorthands.

        `head` (a format) also quantizes the embedding table and lm_head, which the default never touches.

        >>> Policy.uniform(precision="none").is_identity
        True
        """
        setting = Setting(
            sparsity=parse_sparsity(sparsity, rule),
            weights=parse_precision(precision),
            attention=parse_attention(attention),
        )
        label = name or describe(setting)
        rules = ()
        if head is not None:
            rules = (Rule("role:lm_head,embed", Setting(weights=parse_precision(head))),)
            label = name or f"{label}+head:{rules[0].setting.weights.label}"
        return cls(default=setting, rules=rules, name=label)

    @classmethod
    def parse(cls, text: str) -> "Policy":
        """The one shorthand grammar: parts joined by ``+``, each one of

        * ``dense`` (or ``identity``): nothing;
        * a sparsity rule and a percentage: ``topk50``, ``threshold40``, ``weighted30``, ``greedy50``;
        * a weight format: ``int8``, ``int4-g64``, ``int4-g64-asym``, ``int8-block64``, ``fp8``, ``bf16``. It
          covers the embedding and the output head too, as torchao and llama.cpp count a format (at batch
          1 the head is a large share of the bytes a token reads); ``head:FORMAT`` sets the head apart
          (``head:none`` leaves it as loaded);
        * an attention selector: ``topk:64``, ``indexer:0.25``, ``window:4+256``, ``hierarchical:32/128``.

        The CLI's ``--sparsity/--precision/--attention`` flags are the same grammar spelled as flags
        (there a format leaves the head alone unless ``--head-precision`` says otherwise).

        >>> Policy.parse("threshold50+int8").default.weights.label
        'int8'
        """
        if not isinstance(text, str) or not text.strip():
            raise PolicyError(f"a policy shorthand must be a non-empty string, got {text!r}")
        sparsity, rule, precision, attention, head = 0.0, None, "none", "dense", None
        for part in _shorthand_parts(text.strip()):
            m = re.fullmatch(r"([a-z_]+?)(\d+)", part)
            if part in ("dense", "identity"):
                continue
            if part.startswith("head:"):
                head = part[5:]
                parse_precision(head)
            elif ":" in part:
                parse_attention(part)
                attention = part
            elif m and m.group(1) in SPARSITY_RULES and m.group(1) != "dense":
                if int(m.group(2)) >= 100:
                    raise PolicyError(f"cannot parse policy {text!r}: sparsity {part!r} must be below 100%")
                rule, sparsity = m.group(1), int(m.group(2)) / 100
            else:
                parse_precision(part)  # names what is allowed when it is none of the above
                precision = part
        if head is None and precision != "none":
            head = precision
        return cls.uniform(sparsity, rule, precision, attention, name=text.strip(),
                           head=None if head in (None, "none") else head)

    def with_rule(self, match: str, **sections: Any) -> "Policy":
        """Append a rule whose unspecified sections inherit the default: ``with_rule("role:down", weights=W)``."""
        setting = dataclasses.replace(self.default, **sections)
        return dataclasses.replace(self, rules=self.rules + (Rule(match, setting),))

    # ---- JSON ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {"version": POLICY_VERSION, "name": self.name, "default": _setting_to_dict(self.default),
               "rules": [{"match": r.match, **_setting_to_dict(r.setting)} for r in self.rules]}
        if self.calibration is not None:
            out["calibration"] = self.calibration
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any) -> "Policy":
        if not isinstance(data, Mapping):
            raise PolicyError(f"a policy must be a JSON object, got {type(data).__name__}")
        _reject_unknown("policy", data, {"version", "name", "default", "rules", "calibration"})
        version = data.get("version", POLICY_VERSION)
        if version != POLICY_VERSION:
            raise PolicyError(f"policy version {version!r} is not supported; this workbench reads version {POLICY_VERSION}")
        default = _setting_from_dict(data.get("default", {}), Setting(), "default")
        rules_data = data.get("rules", [])
        if not isinstance(rules_data, list):
            raise PolicyError("policy.rules must be a list")
        rules = []
        for i, rd in enumerate(rules_data):
            if not isinstance(rd, Mapping) or "match" not in rd:
                raise PolicyError(f"policy.rules[{i}] must be an object with a 'match' key")
            body = {k: v for k, v in rd.items() if k != "match"}
            rules.append(Rule(rd["match"], _setting_from_dict(body, default, f"rules[{i}]")))
        name = data.get("name", "custom")
        if not isinstance(name, str):
            raise PolicyError(f"policy.name must be a string, got {name!r}")
        return cls(default=default, rules=tuple(rules), name=name, calibration=data.get("calibration"))

    @classmethod
    def from_json(cls, text: str) -> "Policy":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PolicyError(f"policy is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Policy":
        p = Path(path)
        if not p.exists():
            raise PolicyError(f"policy file not found: {p}")
        if not p.is_file():
            raise PolicyError(f"policy must be a JSON file, and {p} is not a regular file")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PolicyError(f"cannot read policy file {p}: {getattr(e, 'strerror', None) or e}") from None
        policy = cls.from_json(text)
        if policy.calibration and not Path(policy.calibration).is_absolute():  # artifacts live beside the policy
            policy = dataclasses.replace(policy, calibration=str(p.parent / policy.calibration))
        return policy


_SECTIONS = {"sparsity": Sparsity, "weights": Weights, "attention": Attention}


def _shorthand_parts(text: str) -> list[str]:
    """Split on ``+``, except inside an attention budget that has its own ``+`` (``window:4+256``): a
    part of digits alone belongs to the part before it."""
    parts: list[str] = []
    for piece in text.split("+"):
        piece = piece.strip()
        if piece.isdigit() and parts and ":" in parts[-1]:
            parts[-1] += "+" + piece
        elif not piece:
            raise PolicyError(f"cannot parse policy {text!r}: an empty part between '+' signs")
        else:
            parts.append(piece)
    return parts


def _setting_to_dict(s: Setting) -> dict:
    return {name: dataclasses.asdict(getattr(s, name)) for name in _SECTIONS}


def _reject_unknown(where: str, data: Mapping, allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise PolicyError(f"unknown key(s) in {where}: {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _setting_from_dict(data: Any, inherit: Setting, where: str) -> Setting:
    """Missing sections inherit from `inherit` (the policy default, for rules)."""
    if not isinstance(data, Mapping):
        raise PolicyError(f"policy.{where} must be an object")
    _reject_unknown(f"policy.{where}", data, set(_SECTIONS))
    parts = {}
    for name, klass in _SECTIONS.items():
        if name not in data:
            parts[name] = getattr(inherit, name)
            continue
        sec = data[name]
        if not isinstance(sec, Mapping):
            raise PolicyError(f"policy.{where}.{name} must be an object")
        fields = {f.name for f in dataclasses.fields(klass)}
        _reject_unknown(f"policy.{where}.{name}", sec, fields)
        try:
            parts[name] = klass(**sec)
        except TypeError as e:
            raise PolicyError(f"policy.{where}.{name}: {e}") from None
    return Setting(**parts)


# ---- CLI-style shorthands -----------------------------------------------------------------------------
def parse_sparsity(target: float, rule: str | None = None) -> Sparsity:
    """``0.4`` with a rule name; sparsity 0 is always the dense identity."""
    if isinstance(target, bool) or not isinstance(target, (int, float)):
        raise PolicyError(f"sparsity must be a number in [0, 1), got {target!r}")
    if not 0.0 <= target < 1.0:
        raise PolicyError(f"sparsity must be in [0, 1), got {target}")
    if target == 0:
        if rule not in (None, "dense") and rule not in SPARSITY_RULES:
            SPARSITY_RULES.get(rule)  # raises with the allowed names
        return Sparsity()
    return Sparsity(rule=rule or DEFAULT_SPARSITY_RULE, target=float(target))


DEFAULT_SPARSITY_RULE = "topk"


def parse_precision(text: str) -> Weights:
    """``int4-g64`` -> Weights("int4", 64); ``int8-block64``; ``int4-g64-asym``; ``none`` or a dtype name."""
    if not isinstance(text, str) or not text:
        raise PolicyError(f"precision must be a format name, got {text!r}")
    parts = text.split("-")
    name, group, symmetric, method, sparse = parts[0], None, True, "rtn", False
    for part in parts[1:]:
        m = re.fullmatch(r"(g|block)(\d+)", part)
        if m:  # int8-gN: int8 in groups along K (the int8g format), not b x b blocks
            group, name = int(m.group(2)), "int8g" if name == "int8" and m.group(1) == "g" else name
        elif part == "asym":
            symmetric = False
        elif part in QUANT_METHODS:
            method = part
        elif part == "sparsecal":
            sparse = True
        else:
            raise PolicyError(f"cannot parse precision {text!r}: expected NAME[-gN|-blockN][-asym][-METHOD[-sparsecal]], "
                              f"NAME one of {', '.join(WEIGHT_FORMATS.names())}, METHOD one of "
                              f"{', '.join(QUANT_METHODS)}")
    return Weights(format=name, group_size=group, symmetric=symmetric, method=method, calibrate_sparse=sparse)


def parse_attention(text: str) -> Attention:
    """``dense``, ``NAME:BUDGET`` with BUDGET a count (``topk:64``) or a fraction (``indexer:0.25``).

    Selectors whose budget has its own grammar (``window:4+256``) parse it through their registry entry.
    """
    if not isinstance(text, str) or not text:
        raise PolicyError(f"attention must be a selector name, got {text!r}")
    name, _, arg = text.partition(":")
    entry = ATTENTION_SELECTORS.get(name)
    if not arg:
        return Attention(selector=name)
    parse = getattr(entry, "parse", None)
    if parse is not None:
        return parse(arg)
    return Attention(selector=name, budget=parse_budget(arg, text))


def parse_budget(arg: str, text: str) -> int | float:
    try:
        return int(arg)
    except ValueError:
        pass
    try:
        return float(arg)
    except ValueError:
        raise PolicyError(f"cannot parse attention budget in {text!r}: expected a key count or a fraction") from None


def describe(setting: Setting) -> str:
    """A short human label: ``topk-0.40+int8+dense``; ``identity`` when nothing changes."""
    if setting.is_identity:
        return "identity"
    parts = []
    if not setting.sparsity.is_identity:
        parts.append(f"{setting.sparsity.rule}-{setting.sparsity.target:.2f}")
    if not setting.weights.is_identity:
        parts.append(setting.weights.label)
    if not setting.attention.is_identity:
        b = setting.attention.budget
        parts.append(setting.attention.selector + (f":{b}" if b is not None else ""))
    return "+".join(parts)
