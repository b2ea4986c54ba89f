"""Local-filesystem storage: fsync'd staging directories and an atomic rename."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import mmap
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from typing import BinaryIO

from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError, InvalidArgumentError, StorageError
from torchkeep.storage.base import TransactionBase, split_key

__all__ = ["LocalStorage"]

_STAGING = ".tk-staging-"
_TRASH = ".tk-trash-"
_OLD = ".tk-old-"  # an entry moved aside while its replacement is renamed in (no exchange)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _is_internal(name: str) -> bool:
    return name.startswith(".") and any(m in name for m in (_STAGING, _TRASH, _OLD))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(name: str) -> int | None:
    """The writer pid encoded in a staging or trash name, or None."""
    for marker in (_STAGING, _TRASH, _OLD):
        if marker in name:
            pid_text = name.split(marker, 1)[1].split("-", 1)[0]
            return int(pid_text) if pid_text.isdigit() else None
    return None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False if unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _storage_error(action: str, path: str, exc: OSError) -> StorageError:
    reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    hint = " Free space or choose another location; earlier checkpoints are untouched."
    return StorageError(f"Could not {action} {path!r}: {reason}.{hint}", path=path)


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2
_WRITEBACK_CHUNK = 64 * 1024 * 1024


class _DurableFile(io.FileIO):
    """A raw file whose ``write`` writes everything and whose ``close`` fsyncs first.

    Every 64 MiB it asks the kernel to start writing the new pages back
    (``sync_file_range``), so the disk works while later data is still being
    copied in and the final fsync has little left to wait for.
    """

    _written = 0
    _flushed = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        total = len(view)
        done = 0
        try:
            while done < total:
                written = super().write(view[done:])
                if not written:
                    raise OSError(errno.EIO, "short write", self.name)
                done += written
        except OSError as exc:
            raise _storage_error("write", str(self.name), exc) from exc
        self._written += total
        if _sync_file_range is not None and self._written - self._flushed >= _WRITEBACK_CHUNK:
            _sync_file_range(self.fileno(), self._flushed, self._written - self._flushed, _SYNC_FILE_RANGE_WRITE)
            self._flushed = self._written
        return total

    def close(self) -> None:
        if self.closed:
            return
        try:
            os.fsync(self.fileno())
        except OSError as exc:
            super().close()
            raise _storage_error("flush", str(self.name), exc) from exc
        super().close()


class _LocalTransaction(TransactionBase):
    def __init__(self, storage: LocalStorage, key: str, *, directory: bool) -> None:
        self.key = key
        self._target = storage._path(key)
        self._directory = directory
        parent, base = os.path.split(self._target)
        self._parent = parent
        self._staging = os.path.join(parent, f".{base}{_STAGING}{os.getpid()}-{secrets.token_hex(4)}")
        self._done = False
        try:
            os.makedirs(parent, exist_ok=True)
            if directory:
                os.mkdir(self._staging)
        except OSError as exc:
            raise _storage_error("create a staging area in", parent, exc) from exc

    def open(self, name: str = "") -> BinaryIO:
        if self._done:
            raise InvalidArgumentError(f"The write of {self._target!r} has already finished.")
        if self._directory:
            if not name:
                raise InvalidArgumentError("A directory entry needs a name for each object.")
            path = os.path.join(self._staging, *split_key(name))
            os.makedirs(os.path.dirname(path), exist_ok=True)
        else:
            if name:
                raise InvalidArgumentError("A single-object entry takes no object name.")
            path = self._staging
        try:
            return _DurableFile(path, "wb")
        except OSError as exc:
            raise _storage_error("create", path, exc) from exc

    def commit(self) -> None:
        if self._done:
            raise InvalidArgumentError(f"The write of {self._target!r} has already finished.")
        try:
            if self._directory:
                for dirpath, _, _ in os.walk(self._staging):
                    _fsync_dir(dirpath)
            self._publish()
            _fsync_dir(self._parent)
        except OSError as exc:
            self.abort()
            raise _storage_error("commit", self._target, exc) from exc
        self._done = True

    def _publish(self) -> None:
        """Rename the staging into place; another writer may create or swap the target meanwhile."""
        for _ in range(10):
            try:
                if os.path.lexists(self._target) and (self._directory or os.path.isdir(self._target)):
                    self._replace_existing()
                else:
                    os.replace(self._staging, self._target)
                return
            except OSError as exc:
                # The target appeared (ENOTEMPTY, EEXIST) or vanished (ENOENT) under us: look again.
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT) or not os.path.exists(self._staging):
                    raise
        raise OSError(errno.EBUSY, "another writer keeps replacing the target", self._target)

    def _replace_existing(self) -> None:
        if _exchange(self._staging, self._target):
            # The old entry now sits at the staging name, invisible to readers.
            _fsync_dir(self._parent)
            _remove(self._staging)
            return
        # No atomic exchange here: move the old entry aside under a name that the
        # next writer restores if we die before the new one is in place.
        base = os.path.basename(self._target)
        old = os.path.join(self._parent, f".{base}{_OLD}{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(self._target, old)
        os.rename(self._staging, self._target)
        _fsync_dir(self._parent)
        _remove(old)

    def abort(self) -> None:
        self._done = True
        _remove(self._staging)


def _recover_moved_aside(directory: str, only: str | None = None) -> set[str]:
    """Put back entries a dead writer moved aside and never replaced (filesystems without exchange).

    Returns the names restored.
    """
    restored: set[str] = set()
    try:
        names = os.listdir(directory)
    except OSError:
        return restored
    for name in names:
        if _OLD not in name or not name.startswith("."):
            continue
        base = name[1 : name.index(_OLD)]
        pid = _owner_pid(name)
        if (only is not None and base != only) or pid is None or _pid_alive(pid):
            continue
        target = os.path.join(directory, base)
        if not os.path.lexists(target):
            with contextlib.suppress(OSError):
                os.rename(os.path.join(directory, name), target)
                _fsync_dir(directory)
                restored.add(base)
    return restored


class LocalStorage:
    """Checkpoints in a directory on a local or network filesystem.

    Writes are staged under a hidden name beside the target
    (``.NAME.tk-staging-PID-RANDOM``), fsync'd, and renamed into place; an
    existing entry is swapped out atomically (``renameat2`` exchange on Linux,
    two renames elsewhere). Staging left by a writer that died is removed by
    the next write into the same directory.

    Args:
        root: the directory keys are relative to; created on the first write.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))

    def __repr__(self) -> str:
        return f"LocalStorage({self.root!r})"

    def _path(self, key: str) -> str:
        if not key:
            return self.root
        return os.path.join(self.root, *split_key(key))

    def describe(self, key: str) -> str:
        return self._path(key)

    def exists(self, key: str) -> bool:
        path = self._path(key)
        if os.path.exists(path):
            return True
        parent, base = os.path.split(path)
        return base in _recover_moved_aside(parent, base)

    def is_dir(self, key: str) -> bool:
        return os.path.isdir(self._path(key))

    def list(self, prefix: str = "") -> list[str]:
        path = self._path(prefix)
        try:
            names = set(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise _storage_error("list", path, exc) from exc
        if any(_OLD in name for name in names):
            names |= _recover_moved_aside(path)
        return sorted(name for name in names if not _is_internal(name))

    def size(self, key: str) -> int:
        path = self._path(key)
        with self._translate("stat", path):
            return os.stat(path).st_size

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(key)
        with self._translate("read", path), open(path, "rb") as f:
            f.seek(offset)
            return f.read() if length is None else f.read(length)

    def read_into(self, key: str, offset: int, buffer: memoryview) -> None:
        path = self._path(key)
        view = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
        with self._translate("read", path):
            fd = os.open(path, os.O_RDONLY)
            try:
                done = 0
                while done < len(view):
                    n = os.preadv(fd, [view[done:]], offset + done)
                    if n == 0:
                        raise CorruptCheckpointError(
                            f"{path!r} ends at byte {offset + done}, before the {len(view)} bytes "
                            f"expected from offset {offset}; it was truncated.",
                            path=path,
                        )
                    done += n
            finally:
                os.close(fd)

    def map(self, key: str) -> memoryview:
        path = self._path(key)
        with self._translate("map", path), open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return memoryview(bytearray())
            return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))

    def local_path(self, key: str) -> str | None:
        return self._path(key)

    def begin(self, key: str, *, directory: bool) -> _LocalTransaction:
        self._clean_stale(os.path.dirname(self._path(key)))
        return _LocalTransaction(self, key, directory=directory)

    def delete(self, key: str) -> None:
        path = self._path(key)
        if not os.path.lexists(path):
            return
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                parent, base = os.path.split(path)
                trash = os.path.join(parent, f".{base}{_TRASH}{os.getpid()}-{secrets.token_hex(4)}")
                os.rename(path, trash)  # the entry disappears at once, then is removed
                _fsync_dir(parent)
                _remove(trash)
            else:
                os.remove(path)
                _fsync_dir(os.path.dirname(path))
        except OSError as exc:
            raise _storage_error("delete", path, exc) from exc

    def _clean_stale(self, directory: str) -> None:
        """Put back entries a dead writer had moved aside, then remove what else it left."""
        _recover_moved_aside(directory)
        try:
            names = os.listdir(directory)
        except OSError:
            return
        for name in names:
            pid = _owner_pid(name) if _is_internal(name) else None
            if pid is not None and not _pid_alive(pid):
                _remove(os.path.join(directory, name))

    @contextlib.contextmanager
    def _translate(self, action: str, path: str) -> Iterator[None]:
        try:
            yield
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise CheckpointNotFoundError(f"No checkpoint at {path!r}.", path=path) from exc
        except IsADirectoryError as exc:
            raise StorageError(f"Could not {action} {path!r}: it is a directory.", path=path) from exc
        except OSError as exc:
            raise _storage_error(action, path, exc) from exc
