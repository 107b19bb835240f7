"""One way to register a kind of pluggable thing (strategies now; model kinds, data formats and
tasks next), as torchvision registers its models: each thing is one module that adds itself to its
kind's :class:`Registry` where it is defined, its package imports each module by name (no
``pkgutil`` discovery), and everyone else asks the registry: ``get(name)``, ``list()``.

A registry is greppable: ``STRATEGIES.add(`` or ``@STRATEGIES.register(`` finds every member.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
F = TypeVar("F")


class UnknownName(LookupError, ValueError):
    """A name no member of the registry has; its message names the members there are."""


class Registry(Generic[T]):
    """Named members of one kind, in the order they were added."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        """What a member is, for messages: ``"strategy"``, ``"model kind"``, ..."""
        self._members: dict[str, T] = {}

    def add(self, name: str, member: T) -> T:
        """Add ``member`` under ``name`` and return it; a name added twice is a programming error."""
        if name in self._members:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._members[name] = member
        return member

    def register(self, name: str) -> Callable[[F], F]:
        """``@registry.register("name")`` on the member's definition (a function, a class)."""

        def add(member: F) -> F:
            self.add(name, member)  # type: ignore[arg-type]
            return member

        return add

    def get(self, name: str) -> T:
        try:
            return self._members[name]
        except KeyError:
            raise UnknownName(f"unknown {self.kind} {name!r}: one of {', '.join(self._members)}") from None

    def list(self) -> list[str]:
        """Every member's name, in the order they were added."""
        return list(self._members)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._members.items())

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def check_names(self, expected: Iterable[str]) -> None:
        """An ``ImportError`` unless the members are exactly ``expected`` (the contract's names)."""
        if set(self._members) != set(expected):
            raise ImportError(f"{self.kind} members {sorted(self._members)} differ from {sorted(expected)}")
