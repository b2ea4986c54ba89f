"""The ``Stateful`` protocol: anything with ``state_dict()`` and ``load_state_dict()``.

Modules, optimizers, schedulers, ``GradScaler``, samplers and the user's own
objects all fit it as they are, so the manager saves and restores them the
same way.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["Stateful", "is_stateful"]


@runtime_checkable
class Stateful(Protocol):
    """An object whose state is saved through ``state_dict()`` and restored through ``load_state_dict()``."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any, /) -> Any: ...


def is_stateful(obj: Any) -> bool:
    """Whether ``obj`` has callable ``state_dict`` and ``load_state_dict`` (a class, not an instance, has not)."""
    return (
        not isinstance(obj, type)
        and callable(getattr(obj, "state_dict", None))
        and callable(getattr(obj, "load_state_dict", None))
    )
