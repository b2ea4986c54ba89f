"""Readers and writers of each on-disk format.

Reading has one way in: :func:`open_checkpoint` tells the format from the
bytes (:func:`~torchkeep.formats.detect.detect_format`) and calls that
format's one opener in :data:`OPENERS`, which returns a source
(:mod:`torchkeep.formats.source`) that every reader uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import TypeVar

from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError
from torchkeep.formats.detect import Format, detect_format
from torchkeep.formats.fileset import open_fileset
from torchkeep.formats.native import open_native
from torchkeep.formats.safetensors_file import open_safetensors, open_sharded_safetensors
from torchkeep.formats.source import Source, TorchFileSource
from torchkeep.gcpause import paused_gc
from torchkeep.integrity import checksum
from torchkeep.manifest import MANIFEST_NAME
from torchkeep.storage import Storage, join_key

__all__ = ["OPENERS", "Format", "Source", "open_checkpoint", "read_consistently"]

T = TypeVar("T")
#: How many times a read is tried again because the checkpoint was replaced while it was read.
ATTEMPTS = 10


def _open_torch_zip(storage: Storage, key: str) -> TorchFileSource:
    return TorchFileSource(Format.TORCH_ZIP, storage.describe(key), storage, key)


def _open_torch_legacy(storage: Storage, key: str) -> TorchFileSource:
    return TorchFileSource(Format.TORCH_LEGACY, storage.describe(key), storage, key)


#: The one opener of each format.
OPENERS: dict[Format, Callable[[Storage, str], Source]] = {
    Format.NATIVE: open_native,
    Format.SAFETENSORS: open_safetensors,
    Format.SAFETENSORS_SHARDED: open_sharded_safetensors,
    Format.TORCH_ZIP: _open_torch_zip,
    Format.TORCH_LEGACY: _open_torch_legacy,
    Format.FILESET: open_fileset,
}


def open_checkpoint(storage: Storage, key: str) -> Source:
    """Open the checkpoint at ``key`` through its format's opener.

    Raises:
        CheckpointNotFoundError: nothing committed there.
        CorruptCheckpointError: the manifest, index or headers are damaged.
        UnsafeCheckpointError: a plain pickle.
        UnsupportedFormatError: bytes of no format torchkeep reads, or a newer format version.
    """
    return OPENERS[detect_format(storage, key)](storage, key)


def _fingerprint(storage: Storage, key: str) -> Hashable | None:
    """What changes when the entry at ``key`` is replaced or deleted; None once it is gone."""
    try:
        # An inode number can be reused at once by the next save, and timestamps can be coarse,
        # so the identity is paired with the content that differs between two saves.
        identity = getattr(storage, "identity", None)
        who = identity(key) if identity is not None else None
        if storage.is_dir(key):
            names = tuple(storage.list(key))
            manifest = checksum(storage.read(join_key(key, MANIFEST_NAME))) if MANIFEST_NAME in names else ""
            return ("dir", who, names, manifest)
        size = storage.size(key)
        ends = storage.read(key, 0, 1 << 16) + storage.read(key, max(0, size - (1 << 16)), 1 << 16)
        return ("file", who, size, checksum(ends))
    except CheckpointNotFoundError:
        return None


def read_consistently(storage: Storage, key: str, read: Callable[[Source], T]) -> T:
    """Open the checkpoint at ``key`` and ``read`` it, telling a replaced checkpoint from a damaged one.

    A writer may replace the checkpoint (a new save of the same path) or
    delete it (retention) while a reader in another process reads it; the
    reader would then pair the old manifest with the new files and see damage
    that is not there. When reading fails, the entry is looked at again: if it
    was replaced meanwhile, the read starts over (a few times); if it was
    deleted, that is a :class:`CheckpointNotFoundError`; only a checkpoint that
    stayed the same is reported as damaged.
    """
    for attempt in range(ATTEMPTS):
        before = _fingerprint(storage, key)
        try:
            with paused_gc():  # a checkpoint of many tensors is many small objects, none in a cycle
                return read(open_checkpoint(storage, key))
        except (CorruptCheckpointError, CheckpointNotFoundError) as err:
            after = _fingerprint(storage, key)
            if after is None:
                if isinstance(err, CheckpointNotFoundError):
                    raise
                where = storage.describe(key)
                raise CheckpointNotFoundError(
                    f"{where!r} was deleted while it was being read; load another checkpoint.", path=where
                ) from err
            if after == before or attempt == ATTEMPTS - 1:
                raise
            time.sleep(min(0.05, 0.001 * 2**attempt))  # let the writer finish what it is doing
    raise AssertionError("unreachable")
