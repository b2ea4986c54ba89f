"""Exclusive locks on a storage folder: an ``flock`` on a local disk, a lease object in an object store,
a process-wide lock in memory.

The kernel releases an ``flock`` when its process dies, so a killed writer
never leaves a folder locked.

The lock file is opened without following links (``O_NOFOLLOW``) and must be a
regular file with one name: a link, pipe, device or hard link planted under its
name in a shared folder is refused with :class:`StorageError`, never written
through. Any ``OSError`` (a read-only folder, a full disk) is a ``StorageError``
naming the path.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading

from torchkeep.errors import DirectoryLockedError, StorageError
from torchkeep.storage import Storage
from torchkeep.storage.local import storage_error
from torchkeep.storage.objectstore import Lease, ObjectStorage

__all__ = ["FolderLock"]

_memory_locks: dict[tuple[int, str], threading.Lock] = {}
_memory_guard = threading.Lock()


class FolderLock:
    """Hold an exclusive lock on ``prefix`` in ``storage`` until :meth:`release`.

    Args:
        storage: the storage holding the folder.
        prefix: the folder's key.
        name: the lock file's name inside the folder (local disks).
        blocking: wait for the lock; otherwise raise :class:`DirectoryLockedError` at once.
        holder: who usually holds it, for the error message.
    """

    def __init__(
        self, storage: Storage, prefix: str, *, name: str, blocking: bool, holder: str = "another writer"
    ) -> None:
        self._fd: int | None = None
        self._memory: threading.Lock | None = None
        self._lease: Lease | None = None
        local = storage.local_path(prefix)
        where = storage.describe(prefix)
        if isinstance(storage, ObjectStorage):
            self._lease = Lease(storage, prefix, name, blocking=blocking, holder=holder)
            return
        if local is None:
            with _memory_guard:
                lock = _memory_locks.setdefault((id(storage), f"{prefix}/{name}"), threading.Lock())
            if not lock.acquire(blocking=blocking):
                raise DirectoryLockedError(
                    f"{where!r} is held by {holder} in this process (pid {os.getpid()} on host "
                    f"{socket.gethostname()}); close it first. Reading needs no lock.",
                    path=where,
                )
            self._memory = lock
            return
        import fcntl

        try:
            os.makedirs(local, exist_ok=True)
        except OSError as exc:
            raise storage_error("create the folder", local, exc) from exc
        fd = _open_lock_file(os.path.join(local, name))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            owner = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
            os.close(fd)
            pid = owner[0] if owner else "unknown"
            host = owner[1] if len(owner) > 1 else "unknown"
            raise DirectoryLockedError(
                f"{where!r} is held by {holder} (pid {pid} on host {host}); two writers would undo each "
                "other's work. Close the other one (its close(), the end of its with block, or its process "
                "ending releases the directory), or write to another directory. Reading needs no lock.",
                path=where,
            ) from None
        except OSError as exc:
            os.close(fd)
            raise storage_error("lock", os.path.join(local, name), exc) from exc
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise storage_error("write the lock file", os.path.join(local, name), exc) from exc
        self._fd = fd

    def release(self) -> None:
        """Give the lock back; safe to call twice."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
        if self._memory is not None:
            self._memory.release()
            self._memory = None
        if self._lease is not None:
            self._lease.release()
            self._lease = None


def _open_lock_file(path: str) -> int:
    """A descriptor of the lock file at ``path``, created if missing: a regular file, never a link's target."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise storage_error("open the lock file", path, exc) from exc
    else:  # refuse a pipe or a device before opening it: opening one can block or have effects
        _check_lock_file(path, found)
    flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):
            _check_lock_file(path, os.lstat(path))
        raise storage_error("open the lock file", path, exc) from exc
    try:
        _check_lock_file(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_lock_file(path: str, found: os.stat_result) -> None:
    if stat.S_ISLNK(found.st_mode):
        try:
            what = f"a symbolic link (to {os.readlink(path)!r})"
        except OSError:
            what = "a symbolic link"
    elif not stat.S_ISREG(found.st_mode):
        what = "not a regular file (a pipe, device, socket or folder)"
    elif found.st_nlink != 1:
        what = f"a file with {found.st_nlink} hard links, so writing it would change another file"
    else:
        return
    raise StorageError(
        f"The lock file {path!r} is {what}; torchkeep never writes through such a file. Someone else may "
        "have planted it in this shared folder: remove it (torchkeep makes a new one) and try again.",
        path=path,
    )
