"""Storage backends, chosen by URL scheme; see :mod:`torchkeep.storage.base` for the protocol."""

from __future__ import annotations

import os

from torchkeep.errors import InvalidArgumentError
from torchkeep.storage.base import Storage, Transaction, join_key, parent_key, split_key
from torchkeep.storage.local import LocalStorage
from torchkeep.storage.memory import MemoryStorage, named_store

__all__ = [
    "LocalStorage",
    "MemoryStorage",
    "Storage",
    "Transaction",
    "join_key",
    "parent_key",
    "resolve",
    "split_key",
]

_SCHEMES = ("file", "memory")


def resolve(path: str | os.PathLike[str], storage: Storage | None = None) -> tuple[Storage, str]:
    """Split a user's path or URL into a storage and the key of the entry in it.

    A plain path or ``file://`` URL gives a :class:`LocalStorage` rooted at the
    parent directory. ``memory://NAME/KEY`` gives the live
    :class:`MemoryStorage` called NAME (one made by the user, whose
    :meth:`~MemoryStorage.describe` gave the URL, or else one made now that
    lives for the process). ``s3://BUCKET/PATH/KEY`` and any other fsspec URL
    give an :class:`~torchkeep.storage.objectstore.ObjectStorage` rooted at
    ``BUCKET/PATH`` (credentials and endpoint from the store's standard
    environment). With ``storage`` given, ``path`` is a key inside it.
    """
    text = os.fspath(path)
    if storage is not None:
        return storage, text.strip("/")
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "file", text
    if scheme == "file":
        full = os.path.abspath(rest)
        parent, name = os.path.split(full.rstrip(os.sep) or os.sep)
        if not name:
            raise InvalidArgumentError(f"{text!r} names no checkpoint: give a file or directory path.")
        return LocalStorage(parent), name
    if scheme == "memory":
        store_name, _, key = rest.partition("/")
        if not store_name or not key:
            raise InvalidArgumentError(f"{text!r} is not a memory URL: use memory://STORE/KEY.")
        return named_store(store_name), key.strip("/")
    if scheme in _fsspec_protocols():
        bucket_path = rest.strip("/")
        root, _, key = bucket_path.rpartition("/")
        if not root or not key:
            raise InvalidArgumentError(
                f"{text!r} names no checkpoint: use {scheme}://BUCKET/KEY (a key inside the bucket)."
            )
        from torchkeep.storage.objectstore import ObjectStorage

        return ObjectStorage(scheme, root), key
    known = ", ".join(f"{s}://" for s in (*_SCHEMES, *sorted(_fsspec_protocols())))
    raise InvalidArgumentError(f"Unknown storage scheme {scheme + '://'!r} in {text!r}; known schemes: {known}.")


def _fsspec_protocols() -> set[str]:
    """The URL schemes fsspec knows (installed or not), so that ``s3://`` works without naming it twice."""
    try:
        from fsspec.registry import known_implementations
    except ImportError:
        return {"s3", "gs", "gcs", "az", "abfs"}
    return {p for p in known_implementations if p not in ("file", "local", "memory")}
