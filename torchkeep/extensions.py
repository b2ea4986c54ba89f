"""Types of the user's own that a state tree may hold, registered explicitly and saved without pickle.

A registered type is saved as the plain tree its ``to_tree`` function returns
and rebuilt on load by its ``from_tree`` function, under a name the caller
chooses, so a checkpoint names what it holds and loading imports nothing.
Dataclasses need no functions: their fields are the tree. Paths are built in.

Registration is process-wide and explicit; a checkpoint holding a type that
is not registered where it is loaded raises (for ``to_tree`` types) or comes
back as a dict of its fields with a warning (for dataclasses).
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from torchkeep.errors import InvalidArgumentError

__all__ = ["Extension", "by_class", "by_name", "register_type"]

T = TypeVar("T", bound=type)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


@dataclasses.dataclass(frozen=True)
class Extension:
    """One registered type: its saved name and the functions that convert it."""

    cls: type
    name: str
    to_tree: Callable[[Any], Any] | None  # None for a dataclass: its fields
    from_tree: Callable[[Any], Any] | None


_by_class: dict[type, Extension] = {}
_by_name: dict[str, Extension] = {}
_lock = threading.Lock()


def register_type(
    cls: T,
    *,
    name: str | None = None,
    to_tree: Callable[[Any], Any] | None = None,
    from_tree: Callable[[Any], Any] | None = None,
) -> T:
    """Let state trees hold instances of ``cls``; returns ``cls``, so it also works as a decorator.

    Args:
        cls: the class. A dataclass needs nothing else: its fields are saved
            (they may hold tensors and anything else a tree holds) and
            ``cls(**fields)`` rebuilds it.
        name: the name written into checkpoints (default ``module.QualName``);
            keep it stable across renames of the class.
        to_tree: turns an instance into a tree torchkeep saves (dicts, lists,
            tensors, plain values...). Required unless ``cls`` is a dataclass.
        from_tree: rebuilds an instance from that tree. Required with ``to_tree``.

    Raises:
        InvalidArgumentError: missing functions, or a name registered for another class.

    Example:
        >>> @torchkeep.register_type
        ... @dataclasses.dataclass
        ... class TrainConfig:
        ...     lr: float
        ...     layers: int
    """
    if not isinstance(cls, type):
        raise InvalidArgumentError(f"register_type takes a class, not {cls!r}.")
    is_dataclass = dataclasses.is_dataclass(cls)
    if (to_tree is None) != (from_tree is None):
        raise InvalidArgumentError("Pass both to_tree and from_tree, or neither (for a dataclass).")
    if to_tree is None and not is_dataclass:
        raise InvalidArgumentError(
            f"{cls.__qualname__} is not a dataclass: pass to_tree= and from_tree= to say how it is saved."
        )
    label = name or f"{cls.__module__}.{cls.__qualname__}"
    if not _NAME.fullmatch(label):
        raise InvalidArgumentError(f"Type name {label!r} must be a dotted identifier.")
    with _lock:
        taken = _by_name.get(label)
        if taken is not None and taken.cls is not cls:
            raise InvalidArgumentError(f"Type name {label!r} is already registered for {taken.cls!r}.")
        ext = Extension(cls, label, to_tree, from_tree)
        _by_class[cls] = ext
        _by_name[label] = ext
    return cls


def by_class(cls: type) -> Extension | None:
    """The registration of exactly this class, if any."""
    return _by_class.get(cls)


def by_name(name: str) -> Extension | None:
    """The registration under a saved name, if any."""
    return _by_name.get(name)
