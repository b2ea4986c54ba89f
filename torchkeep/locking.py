"""Exclusive locks on a storage folder: an ``flock`` on a local disk, a process-wide lock in memory.

The kernel releases an ``flock`` when its process dies, so a killed writer
never leaves a folder locked.
"""

from __future__ import annotations

import os
import socket
import threading

from torchkeep.errors import DirectoryLockedError
from torchkeep.storage import Storage

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
        local = storage.local_path(prefix)
        where = storage.describe(prefix)
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

        os.makedirs(local, exist_ok=True)
        fd = os.open(os.path.join(local, name), os.O_RDWR | os.O_CREAT, 0o644)
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
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the lock back; safe to call twice."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
        if self._memory is not None:
            self._memory.release()
            self._memory = None
