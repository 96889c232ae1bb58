"""Attention key selectors: which past keys each query attends to.

Each selector is a registry entry; `dense` attends to every causal key (the model's own attention).
"""
from __future__ import annotations

from dataclasses import dataclass

from workbench.policy import ATTENTION_SELECTORS


@dataclass(frozen=True)
class SelectorEntry:
    name: str
    doc: str = ""


ATTENTION_SELECTORS.register("dense", SelectorEntry("dense", doc="every causal key: the model's own attention"))
