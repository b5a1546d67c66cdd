"""A name -> object table: the single source of the names a config key may take.

Every concept that configs or the command line name (processes, models, schedules, data
sets, tokenizers, mask kinds, samplers) has one `Registry`, owned by the module that defines
the concept. Entries register themselves where they are defined; config validation and
error messages ask the registry for the allowed names, so no other file lists them.

    PROCESSES = Registry("config.process.name")

    @PROCESSES.register("mdlm")
    class MaskedDiffusion(Process): ...

    PROCESSES.get("mdlm")      # the class; ValueError naming the key and the allowed names
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind. `key` is how a user names an entry (a config key or a
    flag), used in error messages."""

    def __init__(self, key: str):
        self.key = key
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None) -> Callable[[T], T] | T:
        """Registers `entry` under `name`; without `entry`, a decorator that registers what it
        decorates. Raises ValueError when `name` is taken by another entry."""
        def add(value: T) -> T:
            if name in self._entries and self._entries[name] is not value:
                raise ValueError(f"{self.key}: the name {name!r} is already registered "
                                 f"({self._entries[name]!r})")
            self._entries[name] = value
            return value

        return add if entry is None else add(entry)

    def unregister(self, name: str) -> None:
        """Removes `name` (for tests that register an entry for their own duration)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """The entry called `name`; ValueError naming the key and the allowed names."""
        if name not in self._entries:
            raise ValueError(f"{self.key}={name!r}; allowed values: {', '.join(self._entries)}")
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    def items(self):
        return self._entries.items()

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.key!r}: {', '.join(self._entries)})"
