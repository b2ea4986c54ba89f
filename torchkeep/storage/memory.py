"""In-memory storage, for tests of training loops and for tools that never touch disk."""

from __future__ import annotations

import io
import itertools
import threading
import weakref
from typing import BinaryIO

from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError, InvalidArgumentError
from torchkeep.storage.base import TransactionBase, check_open, split_key

__all__ = ["MemoryStorage", "named_store"]

# Every live store by name, so that ``memory://NAME/KEY`` finds the store that wrote it. A store
# made by a user is held weakly (it goes when the user drops it); one made for a URL is also held
# in ``_kept`` and lives for the process, as a URL names no object that could keep it alive.
_stores: weakref.WeakValueDictionary[str, MemoryStorage] = weakref.WeakValueDictionary()
_kept: dict[str, MemoryStorage] = {}
_stores_lock = threading.RLock()
_unnamed = itertools.count(1)


def named_store(name: str) -> MemoryStorage:
    """The live :class:`MemoryStorage` called ``name``, made (and kept for the process) if there is none.

    This is what ``memory://NAME/KEY`` resolves to.

    Args:
        name: the store's name: not empty, without ``/``.

    Raises:
        InvalidArgumentError: ``name`` is not a valid store name.
    """
    with _stores_lock:
        store = _stores.get(_check_name(name))
        if store is None:
            store = _kept[name] = MemoryStorage(name=name)
        return store


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name or "/" in name:
        raise InvalidArgumentError(f"Memory store name {name!r} is not valid: use a non-empty string without '/'.")
    return name


class _MemoryFile(io.BytesIO):
    def __init__(self, on_close: object) -> None:
        super().__init__()
        self._on_close = on_close

    def close(self) -> None:
        if not self.closed:
            self._on_close(self.getvalue())  # type: ignore[operator]
        super().close()


class _MemoryTransaction(TransactionBase):
    def __init__(self, storage: MemoryStorage, key: str, *, directory: bool) -> None:
        self.key = key
        self._storage = storage
        self._directory = directory
        self._objects: dict[str, bytes] = {}
        self._done = False

    def open(self, name: str = "") -> BinaryIO:
        check_open(self.key, name, done=self._done, directory=self._directory)
        full = f"{self.key}/{name}" if name else self.key
        split_key(full)

        def store(data: bytes) -> None:
            self._objects[full] = data

        return _MemoryFile(store)

    def commit(self) -> None:
        if self._done:
            raise InvalidArgumentError(f"The write of {self.key!r} has already finished.")
        self._done = True
        with self._storage._lock:
            self._storage._drop(self.key)
            if self._directory:
                self._storage._dirs.add(self.key)
            self._storage._objects.update(self._objects)

    def abort(self) -> None:
        self._done = True
        self._objects.clear()


class MemoryStorage:
    """A storage that keeps every object in a dict in this process.

    It has the same commit semantics as :class:`LocalStorage` (nothing is
    visible before ``commit``; a commit replaces the old entry in one step), so
    a training loop can be tested against it without a disk. ``map`` returns a
    private copy, so changing a loaded tensor never changes the stored bytes.
    Thread-safe.

    Every store has a name, and :meth:`describe` gives ``memory://NAME/KEY``,
    an address :func:`torchkeep.storage.resolve` (and so ``torchkeep.load``,
    the registry and the command line, in this process) maps back to this store
    for as long as it is alive. ``torchkeep.load("memory://NAME/KEY")`` with a
    name no live store has makes a new store that lives for the process.

    Args:
        name: the store's name (no ``/``); by default a new, unique one. A name
            is taken while its store is alive.

    Raises:
        InvalidArgumentError: ``name`` is not valid, or another live store has it.
    """

    def __init__(self, *, name: str | None = None) -> None:
        self._objects: dict[str, bytes] = {}
        self._dirs: set[str] = set()
        self._lock = threading.Lock()
        with _stores_lock:
            if name is None:
                name = next(n for n in (f"unnamed-{i}" for i in _unnamed) if n not in _stores)
            existing = _stores.get(_check_name(name))
            if existing is not None and existing is not self:
                raise InvalidArgumentError(
                    f"A memory store called {name!r} already exists in this process; reach it through "
                    f"'memory://{name}/KEY' (torchkeep.storage.resolve) or choose another name."
                )
            _stores[name] = self
        self._name = name

    @property
    def name(self) -> str:
        """The store's name: the ``NAME`` in its ``memory://NAME/KEY`` addresses."""
        return self._name

    def __repr__(self) -> str:
        return f"MemoryStorage({self.name!r}, {len(self._objects)} objects)"

    def _drop(self, key: str) -> None:
        prefix = key + "/"
        for name in [k for k in self._objects if k == key or k.startswith(prefix)]:
            del self._objects[name]
        self._dirs -= {d for d in self._dirs if d == key or d.startswith(prefix)}

    def _get(self, key: str) -> bytes:
        with self._lock:
            try:
                return self._objects[key]
            except KeyError:
                where = self.describe(key)
                raise CheckpointNotFoundError(f"No checkpoint at {where!r}.", path=where) from None

    def describe(self, key: str) -> str:
        """``memory://NAME/KEY``: an address that resolves back to this store and ``key``."""
        return f"memory://{self.name}/{key}"

    def exists(self, key: str) -> bool:
        with self._lock:
            return key in self._objects or self._is_dir_locked(key)

    def _is_dir_locked(self, key: str) -> bool:
        if not key or key in self._dirs:
            return True
        prefix = key + "/"
        return any(k.startswith(prefix) for k in self._objects)

    def is_dir(self, key: str) -> bool:
        with self._lock:
            return self._is_dir_locked(key)

    def list(self, prefix: str = "") -> list[str]:
        start = prefix + "/" if prefix else ""
        with self._lock:
            names = {k[len(start) :].split("/", 1)[0] for k in [*self._objects, *self._dirs] if k.startswith(start)}
        return sorted(n for n in names if n)

    def size(self, key: str) -> int:
        return len(self._get(key))

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        data = self._get(key)
        return data[offset:] if length is None else data[offset : offset + length]

    def read_into(self, key: str, offset: int, buffer: memoryview) -> None:
        data = self._get(key)
        view = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
        if offset + len(view) > len(data):
            raise CorruptCheckpointError(
                f"{self.describe(key)!r} holds {len(data)} bytes, fewer than the {len(view)} expected "
                f"from offset {offset}; it was truncated.",
                path=self.describe(key),
            )
        view[:] = data[offset : offset + len(view)]

    def map(self, key: str) -> memoryview:
        return memoryview(bytearray(self._get(key)))

    def local_path(self, key: str) -> str | None:
        return None

    def begin(self, key: str, *, directory: bool) -> _MemoryTransaction:
        split_key(key)
        return _MemoryTransaction(self, key, directory=directory)

    def delete(self, key: str) -> None:
        with self._lock:
            self._drop(key)
