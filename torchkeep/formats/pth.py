"""torch's own ``.pth``/``.pt`` files, read only through its restricted ``weights_only`` unpickler."""

from __future__ import annotations

import io
import pickle
import warnings
import zipfile
from typing import Any

import torch

from torchkeep.errors import CorruptCheckpointError, UnsafeCheckpointError
from torchkeep.scan import scan_bytes, scan_file
from torchkeep.storage import Storage

__all__ = ["crc_check", "load_pth", "write_pth"]

# torch.load's own words when its restricted unpickler meets a global it does not allow.
_UNSAFE_MARKERS = ("Unsupported global", "Unsupported class", "is not an allowed global", "GLOBAL")


def write_pth(storage: Storage, key: str, obj: Any) -> None:
    """``torch.save`` into a staged file, committed atomically."""
    with storage.begin(key, directory=False) as txn, txn.open() as f:
        torch.save(obj, f)


def load_pth(storage: Storage, key: str, *, zip_format: bool, map_location: Any, trust: bool = False) -> Any:
    """Load a torch file with ``weights_only=True``; never falls back to full unpickling.

    Before torch sees the file, its pickles are scanned statically (the same
    code as ``torchkeep scan``): a file importing anything off the safe list is
    refused unless ``trust`` is given, and then loaded with full unpickling
    and a warning.

    Raises:
        UnsafeCheckpointError: the file holds objects beyond tensors and plain containers.
        CorruptCheckpointError: the file is truncated or damaged.
    """
    path = storage.describe(key)
    local = storage.local_path(key)
    scan = scan_file(local) if local is not None else scan_bytes(storage.read(key), path)
    if scan.findings and not trust:
        listed = ", ".join(f"{f.module}.{f.name}" for f in scan.findings[:10])
        raise UnsafeCheckpointError(
            f"{path!r} imports {listed} when unpickled; torchkeep never runs pickled code. If you wrote this "
            "file and trust it, pass trust=True (it will run that code), or re-save its state_dict() with "
            "torchkeep.save.",
            path=path,
        )
    if trust:
        warnings.warn(
            f"Loading {path!r} with full unpickling (trust=True): any code in it runs now.",
            UserWarning,
            stacklevel=3,
        )
    source: Any = local if local is not None else io.BytesIO(storage.read(key))
    try:
        return torch.load(
            source,
            map_location=map_location,
            weights_only=not trust,
            mmap=zip_format and local is not None,
        )
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if any(marker in text for marker in _UNSAFE_MARKERS):
            first = text.strip().splitlines()[-1] if text.strip() else text
            raise UnsafeCheckpointError(
                f"{path!r} holds pickled Python objects beyond tensors and containers "
                f"({first.strip()[:200]}); torchkeep never runs pickled code. If you wrote this file "
                "and trust it, re-save its state_dict() with torchkeep.save.",
                path=path,
            ) from exc
        raise CorruptCheckpointError(f"{path!r} could not be read: {text.strip()[:300]}", path=path) from exc
    except Exception as exc:  # torch.load raises many kinds (zip, pickle, safetensors errors) on bad bytes
        raise CorruptCheckpointError(
            f"{path!r} is not a readable torch file ({type(exc).__name__}: {str(exc).strip()[:300]}); "
            "it is damaged or truncated.",
            path=path,
        ) from exc


def crc_check(storage: Storage, key: str) -> int:
    """Check the CRC-32 of every record in a torch zip file without unpickling anything.

    Returns:
        The number of uncompressed bytes checked.

    Raises:
        ChecksumMismatchError: a record's bytes fail their CRC.
    """
    from torchkeep.errors import ChecksumMismatchError

    path = storage.describe(key)
    local = storage.local_path(key)
    source: Any = local if local is not None else io.BytesIO(storage.read(key))
    damaged = []
    total = 0
    try:
        with zipfile.ZipFile(source) as archive:
            for info in archive.infolist():
                try:
                    with archive.open(info) as member:
                        while chunk := member.read(1 << 24):
                            total += len(chunk)
                except zipfile.BadZipFile:
                    damaged.append(info.filename)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CorruptCheckpointError(f"{path!r} is not a readable zip archive: {exc}.", path=path) from exc
    if damaged:
        raise ChecksumMismatchError(
            f"{path!r} is damaged: record(s) {', '.join(damaged)} fail their CRC-32.", path=path, damaged=damaged
        )
    return total
