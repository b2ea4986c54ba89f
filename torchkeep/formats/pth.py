"""torch's own ``.pth``/``.pt`` files, read only through its restricted ``weights_only`` unpickler."""

from __future__ import annotations

import errno
import io
import os
import pickle
import warnings
import zipfile
from typing import IO, Any, cast

import torch

from torchkeep.errors import CorruptCheckpointError, StorageError, UnsafeCheckpointError
from torchkeep.scan import (
    ScanResult,
    open_regular_file,
    scan_bytes,
    scan_descriptor,
    zip_record_problem,
)
from torchkeep.storage import Storage

__all__ = ["crc_check", "load_pth", "write_pth"]

# torch.load's own words when its restricted unpickler meets a global it does not allow.
_UNSAFE_MARKERS = ("Unsupported global", "Unsupported class", "is not an allowed global", "GLOBAL")
# torch's zip writer's words when the file under it stops taking bytes (inline_container.cc).
_WRITER_MARKERS = ("inline_container", "PytorchStreamWriter", "unexpected pos")


def write_pth(storage: Storage, key: str, obj: Any) -> None:
    """``torch.save`` into a staged file, committed atomically.

    Raises:
        StorageError: the storage failed under torch's writer (the disk is full, an I/O error, a write
            that stopped partway); nothing is left behind.
    """
    path = storage.describe(key)
    try:
        with storage.begin(key, directory=False) as txn, txn.open() as f:
            torch.save(obj, cast(IO[bytes], _WholeWrites(f)))
    except StorageError as exc:
        if exc.path is not None and exc.path == path:
            raise  # already about this checkpoint (the commit)
        raise _write_error(path, exc) from exc
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and _os_error_in(exc) is None and not _from_torch_writer(exc):
            raise
        raise _write_error(path, exc) from exc


class _WholeWrites:
    """The staged file as torch's zip writer sees it: every write writes everything or raises.

    torch ignores what ``write`` returns, so a short write would silently
    leave a hole in the file; here the rest is written, and a write that
    writes nothing is an error.
    """

    def __init__(self, f: Any) -> None:
        self._f = f

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            written = self._f.write(view[done:])
            if written is None:  # a raw file that would block: not something a checkpoint is written to
                raise OSError(errno.EAGAIN, "the file would block")
            if written <= 0:
                raise OSError(errno.EIO, "the storage stopped accepting bytes (a write wrote nothing)")
            done += written
        return done

    def flush(self) -> None:
        self._f.flush()

    def seek(self, offset: int, whence: int = 0) -> int:
        return int(self._f.seek(offset, whence))

    def tell(self) -> int:
        return int(self._f.tell())


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError in ``exc``'s chain (torch's writer wraps the file's error in a RuntimeError, the storage
    in a StorageError): the first one with an errno, else the first one."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    errors = [e for e in seen if isinstance(e, OSError)]
    return next((e for e in errors if e.errno is not None), errors[0] if errors else None)


def _from_torch_writer(exc: BaseException) -> bool:
    return any(marker in str(exc) for marker in _WRITER_MARKERS)


def _write_error(path: str, exc: BaseException) -> StorageError:
    cause = _os_error_in(exc)
    if cause is not None and cause.errno == errno.ENOSPC:
        reason = "the disk is full"
    elif cause is not None and cause.errno is not None:
        reason = cause.strerror or os.strerror(cause.errno)
    elif isinstance(cause, StorageError):
        reason = str(cause).rstrip(".")
    else:
        reason = f"the write stopped partway ({str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc!r})"
    return StorageError(
        f"Could not write {path!r}: {reason}. Free space or choose another location; earlier checkpoints "
        "are untouched and nothing of this one was kept.",
        path=path,
    )


def _refuse(scan: ScanResult, path: str, *, trust: bool) -> None:
    """Raise for what the static scan found: imports first, then damage, then other refusals."""
    imports = [f for f in scan.findings if f.imports]
    if imports and not trust:
        listed = ", ".join(f"{f.module}.{f.name}" for f in imports[:10])
        raise UnsafeCheckpointError(
            f"{path!r} imports {listed} when unpickled; torchkeep never runs pickled code. If you wrote this "
            "file and trust it, pass trust=True (it will run that code), or re-save its state_dict() with "
            "torchkeep.save.",
            path=path,
        )
    if scan.errors:
        raise CorruptCheckpointError(
            f"{path!r} is not a readable torch file: {scan.errors[0].removeprefix(path + ': ')}",
            path=path,
        )
    if scan.findings and not trust:
        listed = "; ".join(f.describe() for f in scan.findings[:5])
        raise UnsafeCheckpointError(
            f"{path!r} holds pickled data that torch's weights_only unpickler refuses ({listed}); torchkeep "
            "never runs pickled code. If you wrote this file and trust it, pass trust=True, or re-save its "
            "state_dict() with torchkeep.save.",
            path=path,
        )
    if scan.kind == "pickle" and not trust:
        raise CorruptCheckpointError(
            f"{path!r} is not a readable torch file: it is neither a torch zip nor a legacy torch file "
            "(no magic number). Load the original checkpoint, or re-save it with torchkeep.save.",
            path=path,
        )


def _same_file_path(fd: int, local: str) -> str:
    """A path that opens the very file ``fd`` is open on, so that torch reads what was scanned."""
    proc = f"/proc/self/fd/{fd}"
    try:
        if os.path.samestat(os.stat(proc), os.fstat(fd)):
            return proc
    except OSError:
        pass
    return local


def load_pth(
    storage: Storage, key: str, *, zip_format: bool, map_location: Any, trust: bool = False, mmap: bool = True
) -> Any:
    """Load a torch file with ``weights_only=True``; never falls back to full unpickling.

    Before torch sees the file, its pickles are scanned statically (the same
    code as ``torchkeep scan``): a file importing anything off the safe list is
    refused unless ``trust`` is given, and then loaded with full unpickling
    and a warning. A local file is opened once, without blocking, and only if
    it is a regular file; torch then reads that same file.

    Raises:
        UnsafeCheckpointError: the file holds objects beyond tensors and plain containers.
        CorruptCheckpointError: the file is truncated or damaged, is not a regular file, or holds
            compressed or encrypted records.
    """
    path = storage.describe(key)
    local = storage.local_path(key)
    if local is None:
        data = storage.read(key)
        _refuse(scan_bytes(data, path), path, trust=trust)
        return _torch_load(io.BytesIO(data), path, map_location=map_location, trust=trust, mmap=False)
    fd = open_regular_file(local, path)
    try:
        _refuse(scan_descriptor(fd, path), path, trust=trust)
        source = _same_file_path(fd, local)
        return _torch_load(source, path, map_location=map_location, trust=trust, mmap=zip_format and mmap)
    finally:
        os.close(fd)


def _torch_load(source: Any, path: str, *, map_location: Any, trust: bool, mmap: bool) -> Any:
    if trust:
        warnings.warn(
            f"Loading {path!r} with full unpickling (trust=True): any code in it runs now.",
            UserWarning,
            stacklevel=4,
        )
    try:
        return torch.load(source, map_location=map_location, weights_only=not trust, mmap=mmap)
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
        CorruptCheckpointError: not a zip, not a regular file, or a record is compressed or encrypted
            (torch.save writes neither; nothing is inflated).
    """
    from torchkeep.errors import ChecksumMismatchError

    path = storage.describe(key)
    local = storage.local_path(key)
    fd = open_regular_file(local, path) if local is not None else None
    try:
        source: Any = io.FileIO(fd, "rb", closefd=False) if fd is not None else io.BytesIO(storage.read(key))
        damaged = []
        total = 0
        try:
            with zipfile.ZipFile(source) as archive:
                infos = archive.infolist()
                for info in infos:
                    problem = zip_record_problem(info)
                    if problem is not None:
                        raise CorruptCheckpointError(f"{path!r} is not a readable torch file: {problem}", path=path)
                for info in infos:
                    try:
                        with archive.open(info) as member:
                            while chunk := member.read(1 << 24):
                                total += len(chunk)
                    except zipfile.BadZipFile:
                        damaged.append(info.filename)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError, NotImplementedError) as exc:
            if isinstance(exc, CorruptCheckpointError):
                raise
            raise CorruptCheckpointError(f"{path!r} is not a readable zip archive: {exc}.", path=path) from exc
    finally:
        if fd is not None:
            os.close(fd)
    if damaged:
        raise ChecksumMismatchError(
            f"{path!r} is damaged: record(s) {', '.join(damaged)} fail their CRC-32.", path=path, damaged=damaged
        )
    return total
