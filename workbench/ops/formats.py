"""Weight formats: how a linear layer's weight is stored and multiplied.

Each format is a registry entry; `none` keeps the model's own weights and dtype (the identity).
"""
from __future__ import annotations

from dataclasses import dataclass

from workbench.policy import WEIGHT_FORMATS


@dataclass(frozen=True)
class WeightFormatEntry:
    name: str
    doc: str = ""

    def label(self, weights) -> str:
        return self.name


WEIGHT_FORMATS.register("none", WeightFormatEntry("none", doc="the model's own weights and dtype"))
