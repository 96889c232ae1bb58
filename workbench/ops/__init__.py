"""Pure tensor functions (no modules, no state), and the registry entries that name them.

Importing this package fills the policy registries; `workbench/__init__.py` does so, so a policy can
validate any registered name as soon as `workbench` is imported.
"""
from workbench.ops import formats, selectors, sparsify  # noqa: F401  (imported to register entries)
