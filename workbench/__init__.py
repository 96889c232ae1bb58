"""workbench: a sparse, quantized and scheduled inference engine for research on cheaper LLM inference.

>>> from workbench import Engine, Policy
>>> engine = Engine.from_pretrained("synthetic:tiny-llama")
>>> engine.reconfigure(Policy.identity())

Kept light on purpose: no plotly, ipywidgets, peft or server imports here.
"""
# importing the method modules fills the policy registries, so any policy validates as soon as
# `workbench` is imported
from workbench.attention import selectors as _selectors  # noqa: F401
from workbench.formats import calibrated as _calibrated  # noqa: F401
from workbench.formats import packed as _packed  # noqa: F401
from workbench.sparsity import rules as _rules  # noqa: F401
from workbench.engine import Engine
from workbench.errors import InputError, ModelError, PolicyError, WorkbenchError
from workbench.policy import Attention, Policy, Rule, Setting, Sparsity, Weights
from workbench.runtime.sampling import SamplingParams

__all__ = ["Engine", "Policy", "Rule", "Setting", "Sparsity", "Weights", "Attention", "SamplingParams",
           "WorkbenchError", "PolicyError", "ModelError", "InputError"]
__version__ = "0.1.0"
