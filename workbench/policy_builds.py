"""What an engine keeps of the policies it ran, so that switching back to one is a swap, not a rebuild.

A policy change used to throw everything built for the old policy away: the wrappers (with their GPU
kernels and the weight layouts those kernels read), and with them the runner's decode graph and every
prefill bucket's graph. Under the elastic controller that cost more than the rung saved (on an H200 at
the Llama-3-8B shape one rebuild took seconds to minutes: `experiments/serving/README.md`). Now:

* the wrappers are remembered by (layer, setting, calibration) (`built`, passed to `apply_policy`): a
  layer switched back to a setting gets the very same module again;
* each policy keeps the *version* number its modules were first built under. When a reconfigure reuses
  every module (nothing new was built), the engine goes back to that version, and a batch runner, which
  keeps its decoders and graphs per version (`runtime.runner`), replays the graphs it captured then: the
  modules, weights and cache they read are the same objects as when they were captured.

The last `keep` policies are kept (their wrappers, layouts and graphs stay in memory); `forget` drops
everything (a LoRA attach or merge changes modules behind the policy's back).
"""
from __future__ import annotations

import itertools
from collections import OrderedDict

KEEP_POLICIES = 4  # a ladder's rungs, or a few slider positions: what stays built beside the current one


class PolicyBuilds:
    def __init__(self, keep: int = KEEP_POLICIES, enabled: bool = True):
        self.keep, self.enabled = keep, enabled
        self.wrappers: dict | None = {} if enabled else None  # apply_policy's `built`
        self.versions: OrderedDict[str, int] = OrderedDict()  # policy key -> the version it was built under
        self._uses: dict[str, set] = {}  # policy key -> the wrapper keys it uses
        self._counter = itertools.count(1)

    def new_version(self) -> int:
        return next(self._counter)

    def settle(self, key: str, model, reused: bool) -> tuple[int, bool]:
        """After `apply_policy` for the policy `key`: (its version, whether it is a new one). A policy whose
        every module was reused gets its old version back; otherwise a new version (its graphs are new)."""
        version = self.versions.get(key) if (self.enabled and reused) else None
        fresh = version is None
        if fresh:
            version = self.new_version()
        if not self.enabled:
            return version, fresh
        self.versions[key] = version
        self.versions.move_to_end(key)
        self._uses[key] = {k for k, (_, module) in self.wrappers.items() if _in_model(model, k[0], module)}
        while len(self.versions) > self.keep:
            old, _ = self.versions.popitem(last=False)
            self._uses.pop(old, None)
        live = set().union(*self._uses.values()) if self._uses else set()
        for k in [k for k in self.wrappers if k not in live]:
            del self.wrappers[k]  # a wrapper no kept policy uses: its layouts are freed with it
        return version, fresh

    def forget(self) -> None:
        if self.wrappers is not None:
            self.wrappers.clear()
        self.versions.clear()
        self._uses.clear()


def _in_model(model, fqn: str, module) -> bool:
    try:
        return model.get_submodule(fqn) is module
    except AttributeError:
        return False
