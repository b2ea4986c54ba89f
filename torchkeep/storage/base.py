"""The storage protocol: the only layer that moves bytes.

A storage holds *entries* addressed by keys (``"run/step-10"``). An entry is
either a single object or a directory of objects (``"run/step-10/manifest.json"``).
Nothing above this layer opens files; nothing in it knows what a tensor is.

Writing goes through a :class:`Transaction`. The call order is fixed:

1. ``storage.begin(key, directory=...)`` reserves a private staging place and
   removes staging left behind by writers that died;
2. ``txn.open(name)`` once per object, writing and closing each; closing makes
   the object durable (fsync on a local disk);
3. ``txn.commit()`` publishes the whole entry at ``key`` atomically, replacing
   an earlier entry there only once the new one is complete; or
   ``txn.abort()`` throws the staging away.

A transaction is a context manager that does step 3 itself: leaving the
``with`` block normally commits, leaving it by any exception aborts::

    with storage.begin("run/step-10", directory=True) as txn:
        with txn.open("manifest.json") as f:
            f.write(data)

Until ``commit`` returns, readers see the previous entry (or none) and
:meth:`Storage.list` never shows the staged one.
"""

from __future__ import annotations

from types import TracebackType
from typing import BinaryIO, Protocol, TypeVar, runtime_checkable

from torchkeep.errors import InvalidArgumentError

__all__ = ["Storage", "Transaction", "TransactionBase", "check_open", "join_key", "parent_key", "split_key"]

_T = TypeVar("_T", bound="TransactionBase")


def split_key(key: str) -> list[str]:
    """The parts of a storage key, refusing anything that could leave the storage's root."""
    parts = key.split("/")
    for part in parts:
        if part in ("", ".", "..") or "\x00" in part or "\\" in part:
            raise InvalidArgumentError(
                f"Storage key {key!r} is not valid: keys are relative, '/'-separated, "
                "and may not contain empty, '.' or '..' parts."
            )
    return parts


def join_key(*parts: str) -> str:
    """Join key parts with ``/``, skipping empty ones (the root is ``""``)."""
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def parent_key(key: str) -> str:
    """The key of the folder holding ``key`` (``""`` at the root)."""
    return key.rsplit("/", 1)[0] if "/" in key else ""


def check_open(key: str, name: str, *, done: bool, directory: bool) -> None:
    """Refuse opening an object after the write finished, or a name that does not fit the entry's kind."""
    if done:
        raise InvalidArgumentError(f"The write of {key!r} has already finished.")
    if directory == (not name):
        raise InvalidArgumentError("A directory entry needs a name for each object; a single-object entry takes none.")


@runtime_checkable
class Transaction(Protocol):
    """A staged write of one entry; see the module docstring for the call order."""

    key: str

    def open(self, name: str = "") -> BinaryIO:
        """A writable binary file for object ``name`` inside the entry.

        ``name`` is ``""`` for a single-object entry. The object is durable once
        the returned file is closed.
        """
        ...

    def commit(self) -> None:
        """Publish the entry atomically at ``key``."""
        ...

    def abort(self) -> None:
        """Discard everything staged; safe to call more than once."""
        ...

    def __enter__(self) -> Transaction: ...

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class TransactionBase:
    """The context-manager half of a :class:`Transaction`: commit on success, abort on any exception.

    Backends subclass it and provide ``open``, ``commit`` and ``abort``.
    """

    def commit(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


@runtime_checkable
class Storage(Protocol):
    """Where checkpoint bytes live: a local directory, memory, later an object store.

    Keys use ``/`` as separator and are relative to the storage's root.
    Reads raise :class:`~torchkeep.errors.CheckpointNotFoundError` for a key
    that is not there and :class:`~torchkeep.errors.StorageError` when the
    backend fails.
    """

    def describe(self, key: str) -> str:
        """A human-readable location for ``key``, used in error messages."""
        ...

    def exists(self, key: str) -> bool:
        """Whether a committed object or directory entry exists at ``key``."""
        ...

    def is_dir(self, key: str) -> bool:
        """Whether ``key`` is a directory entry."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """Names directly under directory ``prefix``, sorted; staging is never listed."""
        ...

    def size(self, key: str) -> int:
        """Size in bytes of the object at ``key``."""
        ...

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """``length`` bytes (all remaining when None) of object ``key`` from ``offset``.

        Fewer bytes come back only when the object ends first.
        """
        ...

    def read_into(self, key: str, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the bytes of object ``key`` starting at ``offset``.

        Streams into memory the caller owns (a parameter, a reused staging
        buffer), so reading costs no allocation. Raises
        :class:`~torchkeep.errors.CorruptCheckpointError` if the object ends first.
        """
        ...

    def map(self, key: str) -> memoryview:
        """The whole object as a writable, copy-on-write buffer, zero-copy where possible.

        Writing into the buffer never changes the stored object.
        """
        ...

    def local_path(self, key: str) -> str | None:
        """A filesystem path for ``key`` when the storage is a local disk, else None."""
        ...

    def begin(self, key: str, *, directory: bool) -> Transaction:
        """Start a staged write of the entry at ``key``."""
        ...

    def delete(self, key: str) -> None:
        """Remove the entry at ``key`` (an object or a whole directory) if present."""
        ...
