"""Activation-sparsity rules: which entries of a linear layer's input to zero.

Each rule is a registry entry; `dense` is the identity (nothing is zeroed).
"""
from __future__ import annotations

from dataclasses import dataclass

from workbench.policy import SPARSITY_RULES


@dataclass(frozen=True)
class SparsityRuleEntry:
    name: str
    needs_calibration: bool = False
    doc: str = ""


SPARSITY_RULES.register("dense", SparsityRuleEntry("dense", doc="no sparsity: the identity"))
