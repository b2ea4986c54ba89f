"""In-memory storage, for tests of training loops and for tools that never touch disk."""

from __future__ import annotations

import io
import threading
from typing import BinaryIO

from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError, InvalidArgumentError
from torchkeep.storage.base import TransactionBase, split_key

__all__ = ["MemoryStorage"]


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
        if self._done:
            raise InvalidArgumentError(f"The write of {self.key!r} has already finished.")
        if self._directory == (not name):
            raise InvalidArgumentError(
                "A directory entry needs a name for each object; a single-object entry takes none."
            )
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
    """

    def __init__(self) -> None:
        self._objects: dict[str, bytes] = {}
        self._dirs: set[str] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryStorage({len(self._objects)} objects)"

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
                raise CheckpointNotFoundError(f"No checkpoint at {self.describe(key)!r}.", path=key) from None

    def describe(self, key: str) -> str:
        return f"memory://{key}"

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
