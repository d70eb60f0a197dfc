"""Name → class tables that code outside the package can extend (forget methods, backbones)."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T", bound=type)


def register(table: dict[str, type], cls: T, what: str) -> T:
    """Add `cls` to `table` under `cls.name` and return it (so it serves as a class decorator); a name is
    registered once (re-registering the same class is a no-op)."""
    if table.get(cls.name, cls) is not cls:
        raise ValueError(f"{what} {cls.name!r} is already registered as {table[cls.name].__name__}")
    table[cls.name] = cls
    return cls
