"""Name -> implementation tables. A new method is one registered entry plus its test.

Policies validate names against these tables, so an unknown name fails at construction with the list of
what is allowed, never deep inside a forward pass.
"""
from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from workbench.errors import PolicyError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named dict that refuses duplicates and names the allowed keys on a miss.

    >>> formats = Registry("weight format")
    >>> formats.register("none", object())
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise PolicyError(f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
