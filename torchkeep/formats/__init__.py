"""Readers and writers of each on-disk format.

Reading has one way in: :func:`open_checkpoint` tells the format from the
bytes (:func:`~torchkeep.formats.detect.detect_format`) and calls that
format's one opener in :data:`OPENERS`, which returns a source
(:mod:`torchkeep.formats.source`) that every reader uses.
"""

from __future__ import annotations

from collections.abc import Callable

from torchkeep.formats.detect import Format, detect_format
from torchkeep.formats.native import open_native
from torchkeep.formats.safetensors_file import open_safetensors, open_sharded_safetensors
from torchkeep.formats.source import Source, TorchFileSource
from torchkeep.storage import Storage

__all__ = ["OPENERS", "Format", "Source", "open_checkpoint"]


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
