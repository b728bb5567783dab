"""A tiny named registry, one per kind (enhancers, priors, metrics), in the manner of timm.

Each registry maps a public name to a factory and its metadata (``register(name, **info)``;
for an enhancer: whether it trains, its default loss, its model class, whether it ships
weights). ``create`` is the single way callers build an instance, so an unknown name fails
in one place with the list of known ones; ``info`` is how callers read what a name is,
instead of hard-coding names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name no factory was registered under."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}
        self._info: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **info: Any) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def wrap(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = factory
            self._info[name] = info
            return factory

        return wrap

    def info(self, name: str) -> dict[str, Any]:
        """The metadata ``name`` was registered with (UnknownNameError if none)."""
        self.get(name)
        return self._info.get(name, {})

    def names_where(self, key: str) -> list[str]:
        """Names whose metadata has a true ``key`` (e.g. ``trainable``)."""
        return [n for n in self.names() if self._info.get(n, {}).get(key)]

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._factories[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def create(self, name: str, **kwargs) -> T:
        return self.get(name)(**kwargs)
