"""Named registries of models and methods (datasets are registered by their YAML files)."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from hetcomp.errors import HetCompError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object mapping whose lookups fail with the list of valid names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise HetCompError(
                f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


#: Backbones (teachers and the student), filled by ``hetcomp.models``.
MODELS: Registry = Registry("model")
#: Training methods (w/o KD, HetComp, baselines), filled by ``hetcomp.distill`` and ``baselines``.
METHODS: Registry = Registry("method")


def load_all() -> None:
    """Import the modules whose import registers every model and method."""
    import baselines  # noqa: F401
    import hetcomp.distill  # noqa: F401
    import hetcomp.models  # noqa: F401
