"""Local-filesystem storage: fsync'd staging directories and an atomic rename.

Ownership of staging
--------------------
Every write (and every delete) owns the hidden entries it makes beside its
target through an ``flock`` on a small lock file, ``.NAME.tk-lock-PID-RANDOM``,
held from before the first entry exists until the last one is gone. The
entries share its ``PID-RANDOM`` token: ``.NAME.tk-staging-TOKEN`` (the new
entry), ``.NAME.tk-old-TOKEN`` (the old entry moved aside where
``renameat2`` exchange is missing) and ``.NAME.tk-trash-TOKEN`` (an entry
being deleted). The lock file holds ``PID KERNEL-ID HOST`` (the kernel id is
``/proc/sys/kernel/random/boot_id``) and its modification time is refreshed
while the owner writes.

A writer cleaning a folder treats another owner's entries as abandoned only
when it can take that owner's lock without waiting *and* the owner ran on the
same kernel (the kernel released the lock, so the owner is dead: this holds
across PID namespaces, containers sharing a volume included). An owner on
another kernel (another NFS client, whose locks may be local to it, or a boot
before a crash) is judged abandoned only once its lock file has not been
touched for :data:`STALE_AFTER_S` seconds. Entries without a lock file (left
by a torchkeep before this scheme) are removed only when their PID is dead
here and they are that old too; an old entry moved aside is put back sooner,
since putting it back loses nothing. The process id in a name is never
enough on its own.

A writer whose staging was removed or replaced anyway (a cleaner that ignored
the lock) fails at its next ``open()`` or at ``commit()`` with
:class:`~torchkeep.errors.StorageError` and publishes nothing.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import errno
import functools
import io
import mmap
import os
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO

from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidArgumentError,
    StorageError,
    TorchkeepError,
)
from torchkeep.storage.base import TransactionBase, split_key

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: ownership falls back to the age of the lock file
    fcntl = None  # type: ignore[assignment]

__all__ = ["STALE_AFTER_S", "LocalStorage", "storage_error"]

_STAGING = ".tk-staging-"
_TRASH = ".tk-trash-"
_OLD = ".tk-old-"  # an entry moved aside while its replacement is renamed in (no exchange)
_LOCK = ".tk-lock-"  # the owner's lock file of the entries sharing its token
_MARKERS = (_STAGING, _TRASH, _OLD, _LOCK)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100

STALE_AFTER_S = 3600.0
"""Seconds without a sign of life after which an owner that ran on another kernel is judged gone."""

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_READ_FLAGS = os.O_RDONLY | _NONBLOCK | _CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
_DIR_FLAGS = os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC
_LOCK_ERRNOS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS, errno.EBADF)


def _is_internal(name: str) -> bool:
    return name.startswith(".") and any(m in name for m in _MARKERS)


def _internal_names(names: list[str]) -> list[str]:
    """The internal names among ``names``; one scan of the joined names first, since there usually are none."""
    joined = "\0".join(names)
    if not any(marker in joined for marker in _MARKERS):
        return []
    return [name for name in names if _is_internal(name)]


def _parse_internal(name: str) -> tuple[str, str, str] | None:
    """``(base, marker, token)`` of an internal name ``.BASE<marker>TOKEN``, or None."""
    if not name.startswith("."):
        return None
    for marker in _MARKERS:
        index = name.find(marker)
        if index > 1:
            return name[1:index], marker, name[index + len(marker) :]
    return None


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is alive *in this PID namespace*; says nothing about other containers or hosts."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@functools.cache
def _kernel_id() -> str:
    """This kernel's boot id (shared by every container on it), else the host name."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read(64).strip()
    except OSError:
        boot = ""
    return boot or f"host:{socket.gethostname()}"


def _disk_usage(path: str) -> int:
    """Bytes of the files under ``path`` (links not followed)."""
    if not os.path.isdir(path) or os.path.islink(path):
        with contextlib.suppress(OSError):
            return os.lstat(path).st_size
        return 0
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
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


def storage_error(action: str, path: str, exc: OSError, *, writing: bool = True) -> StorageError:
    """A :class:`StorageError` for ``exc``, naming ``path``, the cause and what to do.

    Raise it ``from exc``. ``writing`` adds that earlier checkpoints are untouched.
    """
    code = exc.errno
    untouched = " Earlier checkpoints are untouched." if writing else ""
    if code in (errno.ENOSPC, errno.EDQUOT):
        reason = "the disk is full (no free space or no free inodes, or the quota is used up)"
        hint = f"Free space or choose another location.{untouched}"
    elif code == errno.EROFS:
        reason = "the filesystem is read-only"
        hint = (
            "Writing needs a writable folder: remount it read-write or write somewhere else. "
            f"Reading needs no lock and works on a read-only folder.{untouched}"
        )
    elif code in (errno.EACCES, errno.EPERM):
        reason = "permission denied"
        hint = f"Check the folder's owner and permissions, or choose another location.{untouched}"
    else:
        reason = exc.strerror or str(exc)
        hint = f"Check the disk and try again.{untouched}"
    return StorageError(f"Could not {action} {path!r}: {reason}. {hint}", path=path)


_storage_error = storage_error  # the name used before it was shared with locking.py


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file"


def _not_regular(path: str, mode: int) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path!r} is {_kind(mode)}, not a regular file; a checkpoint's files are plain files, so it was "
        "replaced or planted. Remove it, or restore the file from a copy.",
        path=path,
    )


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
    copied in and the final fsync has little left to wait for, and tells its
    owner it is alive.
    """

    _written = 0
    _flushed = 0
    _heartbeat: Callable[[], None] | None = None

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
            raise storage_error("write", str(self.name), exc) from exc
        self._written += total
        if self._written - self._flushed >= _WRITEBACK_CHUNK:
            if _sync_file_range is not None:
                _sync_file_range(self.fileno(), self._flushed, self._written - self._flushed, _SYNC_FILE_RANGE_WRITE)
            self._flushed = self._written
            if self._heartbeat is not None:
                self._heartbeat()
        return total

    def close(self) -> None:
        if self.closed:
            return
        try:
            os.fsync(self.fileno())
        except OSError as exc:
            super().close()
            raise storage_error("flush", str(self.name), exc) from exc
        super().close()


class _OwnerLock:
    """The flock that marks one writer's hidden entries in ``directory`` as alive.

    Made before the first entry, released (and its file removed) after the last.
    """

    def __init__(self, directory: str, base: str, *, action: str = "create a staging area in") -> None:
        self.fd = -1
        for _ in range(8):
            token = f"{os.getpid()}-{secrets.token_hex(4)}"
            path = os.path.join(directory, f".{base}{_LOCK}{token}")
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o644)
            except FileExistsError:
                continue
            except OSError as exc:
                raise storage_error(action, directory, exc) from exc
            try:
                if fcntl is not None:
                    with contextlib.suppress(OSError):  # no lock support here: the age of the file speaks
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                mine, there = os.fstat(fd), os.lstat(path)
                if (mine.st_dev, mine.st_ino) != (there.st_dev, there.st_ino):
                    raise FileNotFoundError(errno.ENOENT, "taken by a cleaner", path)
                os.pwrite(fd, f"{os.getpid()} {_kernel_id()} {socket.gethostname()}\n".encode(), 0)
            except FileNotFoundError:  # a cleaner took the empty file for an orphan: try another name
                os.close(fd)
                continue
            except OSError as exc:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.remove(path)
                raise storage_error(action, directory, exc) from exc
            self.fd, self.path, self.token = fd, path, token
            return
        raise StorageError(
            f"Could not create a lock file for a staging area in {directory!r}: every name tried was taken "
            "or removed at once. Check that nothing else is deleting files there, then save again.",
            path=directory,
        )

    def touch(self) -> None:
        """Show the owner is alive to cleaners on other kernels (refresh the file's mtime)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError, NotImplementedError):
                os.utime(self.fd)

    def release(self) -> None:
        """Remove the lock file (if still ours) and give the lock back; safe to call twice."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            mine, there = os.fstat(self.fd), os.lstat(self.path)
            if (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino):
                os.remove(self.path)
        os.close(self.fd)
        self.fd = -1

    def __del__(self) -> None:  # a transaction dropped without commit or abort
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


class _Claim:
    """The lock of an owner judged gone, held while its entries are cleaned up.

    ``may_remove``: its entries may be removed; otherwise only an old entry may be put back.
    """

    def __init__(self, fd: int, lock_path: str | None, *, may_remove: bool) -> None:
        self._fd = fd
        self._lock_path = lock_path
        self.may_remove = may_remove

    def release(self, *, remove_lock: bool) -> None:
        if remove_lock and self.may_remove and self._lock_path is not None:
            with contextlib.suppress(OSError):
                os.remove(self._lock_path)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _entry_age(path: str) -> float:
    """Seconds since anything in the entry at ``path`` was last modified (0 if it cannot be read)."""
    try:
        newest = os.lstat(path).st_mtime
        if os.path.isdir(path) and not os.path.islink(path):
            for dirpath, dirnames, filenames in os.walk(path):
                for name in dirnames + filenames:
                    with contextlib.suppress(OSError):
                        newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    except OSError:
        return 0.0
    return time.time() - newest


def _claim(directory: str, base: str, token: str, entries: list[str]) -> _Claim | None:
    """A claim on the entries of the owner ``token`` if that owner is gone, else None (alive or unknown)."""
    lock_path = os.path.join(directory, f".{base}{_LOCK}{token}")
    try:
        fd = os.open(lock_path, os.O_RDWR | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
    except FileNotFoundError:
        return _claim_without_lock(directory, token, entries)
    except OSError:
        try:  # a read-only folder: readers may still restore an entry if the owner is gone
            fd = os.open(lock_path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
        except OSError:
            return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a lock file")
        locked = False
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                raise OSError(errno.EAGAIN, "held") from None
            except OSError as exc:
                if exc.errno not in _LOCK_ERRNOS:
                    raise
        mine, there = os.fstat(fd), os.lstat(lock_path)
        if (mine.st_dev, mine.st_ino) != (there.st_dev, there.st_ino):
            raise OSError(errno.ESTALE, "the owner finished")
        owner = os.pread(fd, 512, 0).decode("utf-8", "replace").split()
        same_kernel = len(owner) > 1 and owner[1] == _kernel_id()
        quiet_for = time.time() - mine.st_mtime
        if (locked and same_kernel) or quiet_for > STALE_AFTER_S:
            return _Claim(fd, lock_path, may_remove=True)
    except OSError:
        pass
    os.close(fd)
    return None


def _claim_without_lock(directory: str, token: str, entries: list[str]) -> _Claim | None:
    """Entries with no lock file: left by a torchkeep from before owner locks (or forged).

    The PID alone never decides: its process must be dead here *and* the entries
    older than :data:`STALE_AFTER_S` before anything is removed; an old entry
    moved aside may be put back as soon as the PID is dead here, since putting
    it back loses nothing.
    """
    pid_text = token.split("-", 1)[0]
    if not pid_text.isdigit() or _pid_alive(int(pid_text)):
        return None
    aged = all(_entry_age(os.path.join(directory, n)) > STALE_AFTER_S for n in entries)
    if not aged and not any(_OLD in n for n in entries):
        return None
    return _Claim(-1, None, may_remove=aged)


def _groups(names: list[str]) -> dict[tuple[str, str], list[str]]:
    groups: dict[tuple[str, str], list[str]] = {}
    for name in _internal_names(names):
        parsed = _parse_internal(name)
        if parsed is not None:
            base, _, token = parsed
            groups.setdefault((base, token), []).append(name)
    return groups


def _restore_old(directory: str, name: str, base: str) -> bool:
    target = os.path.join(directory, base)
    if os.path.lexists(target):
        return False
    try:
        os.rename(os.path.join(directory, name), target)
        _fsync_dir(directory)
    except OSError:
        return False
    return True


def _recover_moved_aside(directory: str, only: str | None = None) -> set[str]:
    """Put back entries a dead writer moved aside and never replaced (filesystems without exchange).

    Returns the names restored. Nothing else is removed: that is left to the next writer.
    """
    restored: set[str] = set()
    try:
        names = os.listdir(directory)
    except OSError:
        return restored
    for (base, token), members in _groups(names).items():
        old = [n for n in members if _OLD in n]
        if not old or (only is not None and base != only) or os.path.lexists(os.path.join(directory, base)):
            continue
        claim = _claim(directory, base, token, members)
        if claim is None:
            continue
        try:
            if _restore_old(directory, old[0], base):
                restored.add(base)
        finally:
            claim.release(remove_lock=False)
    return restored


class _LocalTransaction(TransactionBase):
    def __init__(self, storage: LocalStorage, key: str, *, directory: bool) -> None:
        self.key = key
        self._target = storage._path(key)
        self._directory = directory
        parent, base = os.path.split(self._target)
        self._parent = parent
        self._done = False
        self._dir_fd = -1
        self._identity: tuple[int, int] | None = None
        self._objects: list[tuple[str, int, int]] = []  # (name, st_dev, st_ino) of each object made
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise storage_error("create the folder", parent, exc) from exc
        self._owner = _OwnerLock(parent, base)
        self._staging = os.path.join(parent, f".{base}{_STAGING}{self._owner.token}")
        self._old = os.path.join(parent, f".{base}{_OLD}{self._owner.token}")
        if directory:
            try:
                os.mkdir(self._staging)
                self._dir_fd = os.open(self._staging, _DIR_FLAGS)
                st = os.fstat(self._dir_fd)
            except OSError as exc:
                self.abort()
                raise storage_error("create a staging area in", parent, exc) from exc
            self._identity = (st.st_dev, st.st_ino)

    def share(self) -> str:
        """A token with which other processes add objects to this directory's staging (:meth:`LocalStorage.join`)."""
        if not self._directory or self._done:
            raise InvalidArgumentError(f"Only an unfinished directory write of {self._target!r} can be shared.")
        return self._owner.token

    def _vanished(self, why: str) -> StorageError:
        return StorageError(
            f"The staging area {self._staging!r} of the save to {self._target!r} {why} while this save was "
            "writing it: another process sharing the folder (a container or host whose process ids differ "
            f"from these) took it for abandoned. Nothing was published and {self._target!r} is unchanged; "
            "save again, and make sure every writer to this folder runs a torchkeep that locks its staging.",
            path=self._staging,
        )

    def _check_staging(self) -> None:
        """Raise if the staging is no longer the entry this transaction made, or lost an object."""
        if self._identity is None:
            return
        try:
            st = os.lstat(self._staging)
        except FileNotFoundError:
            raise self._vanished("was removed") from None
        if (st.st_dev, st.st_ino) != self._identity:
            raise self._vanished("was replaced by another entry")
        if not self._directory:
            return
        for name, dev, ino in self._objects:
            try:
                st = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                raise self._vanished(f"lost its object {name!r}") from None
            if (st.st_dev, st.st_ino) != (dev, ino):
                raise self._vanished(f"had its object {name!r} replaced")

    def open(self, name: str = "") -> BinaryIO:
        if self._done:
            raise InvalidArgumentError(f"The write of {self._target!r} has already finished.")
        if self._directory:
            if not name:
                raise InvalidArgumentError("A directory entry needs a name for each object.")
            parts = split_key(name)
            path = os.path.join(self._staging, *parts)
        else:
            if name:
                raise InvalidArgumentError("A single-object entry takes no object name.")
            if self._identity is not None:
                raise InvalidArgumentError(f"The single object of {self._target!r} was already opened.")
            path = self._staging
        self._check_staging()
        try:
            fd = self._create(name) if self._directory else os.open(path, _CREATE_FLAGS, 0o666)
            st = os.fstat(fd)
        except FileExistsError as exc:
            raise StorageError(
                f"Could not create {path!r}: something is already there (an object written twice, or a file "
                "or link planted in the staging area); torchkeep never writes through an existing name. "
                f"Nothing was published and {self._target!r} is unchanged.",
                path=path,
            ) from exc
        except FileNotFoundError:
            raise self._vanished("was removed") from None
        except OSError as exc:
            raise storage_error("create", path, exc) from exc
        if self._directory:
            self._objects.append((name, st.st_dev, st.st_ino))
        else:
            self._identity = (st.st_dev, st.st_ino)
        self._owner.touch()
        f = _DurableFile(fd, "wb")
        f.name = path
        f._heartbeat = self._owner.touch
        return f

    def _create(self, name: str) -> int:
        """Create object ``name`` inside the staging through its descriptor: never through a link."""
        *folders, last = split_key(name)
        fd = self._dir_fd
        opened: list[int] = []
        try:
            for part in folders:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
                fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                opened.append(fd)
            return os.open(last, _CREATE_FLAGS, 0o666, dir_fd=fd)
        finally:
            for sub in opened:
                os.close(sub)

    def commit(self) -> None:
        if self._done:
            raise InvalidArgumentError(f"The write of {self._target!r} has already finished.")
        try:
            self._check_staging()
            if self._identity is None:
                raise InvalidArgumentError(
                    f"Nothing was written for {self._target!r}: open its object before committing."
                )
            if self._directory:
                for dirpath, _, _ in os.walk(self._staging):
                    _fsync_dir(dirpath)
            self._owner.touch()
            self._check_staging()
            self._publish()
            _fsync_dir(self._parent)
        except TorchkeepError:
            self.abort()
            raise
        except OSError as exc:
            self.abort()
            raise storage_error("commit", self._target, exc) from exc
        self._done = True
        self._finish()

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
        # No atomic exchange here: move the old entry aside under a name (sharing this
        # transaction's lock) that the next reader or writer restores if we die in between.
        os.rename(self._target, self._old)
        os.rename(self._staging, self._target)
        _fsync_dir(self._parent)
        _remove(self._old)

    def abort(self) -> None:
        self._done = True
        if self._identity is not None:
            with contextlib.suppress(OSError):
                st = os.lstat(self._staging)
                if (st.st_dev, st.st_ino) == self._identity:
                    _remove(self._staging)
        self._finish()

    def _finish(self) -> None:
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1
        self._owner.release()


class _JoinedLocal:
    """Another process's share of a directory write: objects created in its staging, fsync'd on close.

    It publishes nothing; the process that began the write commits or aborts it.
    """

    def __init__(self, storage: LocalStorage, key: str, token: str) -> None:
        target = storage._path(key)
        parent, base = os.path.split(target)
        self.key = key
        self._staging = os.path.join(parent, f".{base}{_STAGING}{token}")
        self._names: set[str] = set()
        try:
            self._dir_fd = os.open(self._staging, _DIR_FLAGS)
        except OSError as exc:
            raise StorageError(
                f"The staging area {self._staging!r} of the save to {target!r} is not there to be joined: the "
                "process that began the save aborted it, or this process does not see the same folder (every "
                "process of a distributed save must reach the same storage).",
                path=self._staging,
            ) from exc

    def open(self, name: str) -> BinaryIO:
        if self._dir_fd < 0:
            raise InvalidArgumentError(f"The share of the write of {self.key!r} was closed.")
        if name in self._names:
            raise StorageError(f"{name!r} was already written in this save of {self.key!r}.", path=self.key)
        if len(split_key(name)) != 1:
            raise InvalidArgumentError(f"A joined write creates top-level objects only, not {name!r}.")
        path = os.path.join(self._staging, name)
        try:
            fd = os.open(name, _CREATE_FLAGS, 0o666, dir_fd=self._dir_fd)
        except OSError as exc:
            raise storage_error("create", path, exc) from exc
        self._names.add(name)
        f = _DurableFile(fd, "wb")
        f.name = path
        return f

    def close(self) -> None:
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1


class LocalStorage:
    """Checkpoints in a directory on a local or network filesystem.

    Writes are staged under a hidden name beside the target
    (``.NAME.tk-staging-PID-RANDOM``), fsync'd, and renamed into place; an
    existing entry is swapped out atomically (``renameat2`` exchange on Linux,
    two renames elsewhere). Each writer holds an ``flock`` on
    ``.NAME.tk-lock-PID-RANDOM`` while its staging exists; staging whose lock
    was given back by a dead writer is removed by the next write into the same
    directory (see the module docstring for owners on other kernels).

    Reads open regular files only: a named pipe, a device or a socket where a
    file is expected raises :class:`~torchkeep.errors.CorruptCheckpointError`
    at once, and no read goes past the file's size.

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
            names = os.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise storage_error("list", path, exc, writing=False) from exc
        internal = _internal_names(names)
        if not internal:
            return sorted(names)
        listed = set(names).difference(internal)
        if any(_OLD in name for name in internal):
            listed |= _recover_moved_aside(path)
        return sorted(listed)

    def identity(self, key: str) -> tuple[int, int, int]:
        """``(st_dev, st_ino, st_ctime_ns)`` of the entry at ``key``, following links.

        Equal before and after a read when the entry was neither replaced
        (re-saved: the new entry is another inode, renamed in) nor deleted
        meanwhile. Compare values for equality only. Optional in the storage
        protocol: callers use ``getattr(storage, "identity", None)``.

        Raises:
            CheckpointNotFoundError: nothing is at ``key`` (never saved, or deleted).
        """
        path = self._path(key)
        with self._translate("stat", path, writing=False):
            st = os.stat(path)
        return (st.st_dev, st.st_ino, st.st_ctime_ns)

    def size(self, key: str) -> int:
        path = self._path(key)
        with self._translate("stat", path, writing=False):
            return os.stat(path).st_size

    def _open_regular(self, path: str) -> tuple[int, int]:
        """A read-only descriptor of the regular file at ``path`` and its size; never blocks.

        Links are followed (a checkpoint may be a link, as in the Hugging Face
        cache); the native format refuses links inside its checkpoints itself.
        A pipe, device or socket is refused before it is opened and again after.
        """
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        fd = os.open(path, _READ_FLAGS)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _not_regular(path, st.st_mode)
        except BaseException:
            os.close(fd)
            raise
        return fd, st.st_size

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(key)
        with self._translate("read", path, writing=False):
            fd, size = self._open_regular(path)
            try:
                end = size if length is None else min(size, offset + max(length, 0))
                chunks: list[bytes] = []
                position = offset
                while position < end:
                    chunk = os.pread(fd, min(end - position, 1 << 30), position)
                    if not chunk:
                        break  # truncated while read: the caller sees fewer bytes
                    chunks.append(chunk)
                    position += len(chunk)
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            finally:
                os.close(fd)

    def read_into(self, key: str, offset: int, buffer: memoryview) -> None:
        path = self._path(key)
        view = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
        with self._translate("read", path, writing=False):
            fd, _ = self._open_regular(path)
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
        with self._translate("map", path, writing=False):
            fd, size = self._open_regular(path)
            try:
                if size == 0:
                    return memoryview(bytearray())
                return memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_COPY))
            finally:
                os.close(fd)

    def local_path(self, key: str) -> str | None:
        return self._path(key)

    def begin(self, key: str, *, directory: bool) -> _LocalTransaction:
        self._clean_stale(os.path.dirname(self._path(key)))
        return _LocalTransaction(self, key, directory=directory)

    def join(self, key: str, token: str) -> _JoinedLocal:
        """Add objects to the directory write of ``key`` begun elsewhere and shared as ``token``."""
        return _JoinedLocal(self, key, token)

    def delete(self, key: str) -> None:
        path = self._path(key)
        if not os.path.lexists(path):
            return
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                parent, base = os.path.split(path)
                owner = _OwnerLock(parent, base, action="delete an entry in")
                try:
                    trash = os.path.join(parent, f".{base}{_TRASH}{owner.token}")
                    os.rename(path, trash)  # the entry disappears at once, then is removed
                    _fsync_dir(parent)
                    _remove(trash)
                finally:
                    owner.release()
            else:
                os.remove(path)
                _fsync_dir(os.path.dirname(path))
        except FileNotFoundError:
            return  # deleted meanwhile by someone else
        except TorchkeepError:
            raise
        except OSError as exc:
            raise storage_error("delete", path, exc) from exc

    def leftovers(self, prefix: str = "") -> builtins.list[tuple[str, int]]:
        """The hidden entries writers left in folder ``prefix`` (staging, moved aside, being deleted).

        Returns each name with its size in bytes. A live writer's entries are
        listed too: :meth:`clean` decides what may go.
        """
        directory = self._path(prefix)
        try:
            names = os.listdir(directory)
        except OSError:
            return []
        found = []
        for name in sorted(names):
            if _is_internal(name) and _LOCK not in name:
                found.append((name, _disk_usage(os.path.join(directory, name))))
        return found

    def clean(self, prefix: str = "") -> builtins.list[str]:
        """Remove what abandoned writers left in folder ``prefix``, never a live writer's; the names removed."""
        before = {name for name, _ in self.leftovers(prefix)}
        self._clean_stale(self._path(prefix))
        return sorted(before - {name for name, _ in self.leftovers(prefix)})

    def _clean_stale(self, directory: str) -> None:
        """Put back what abandoned writers had moved aside, then remove what else they left.

        An owner counts as gone only as :func:`_claim` decides: never from its PID alone.
        """
        try:
            names = os.listdir(directory)
        except OSError:
            return
        for (base, token), members in _groups(names).items():
            claim = _claim(directory, base, token, members)
            if claim is None:
                continue
            try:
                for name in sorted(members, key=lambda n: _OLD not in n):  # put back first
                    if _LOCK in name:
                        continue
                    if _OLD in name and _restore_old(directory, name, base):
                        continue
                    if claim.may_remove:
                        _remove(os.path.join(directory, name))
            finally:
                claim.release(remove_lock=True)

    @contextlib.contextmanager
    def _translate(self, action: str, path: str, *, writing: bool = True) -> Iterator[None]:
        try:
            yield
        except TorchkeepError:
            raise
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise CheckpointNotFoundError(
                f"No checkpoint at {path!r} (nothing there now: never saved, or deleted meanwhile).", path=path
            ) from exc
        except IsADirectoryError as exc:
            raise StorageError(f"Could not {action} {path!r}: it is a directory.", path=path) from exc
        except OSError as exc:
            if exc.errno == errno.ESTALE:  # an NFS file deleted on the server under this reader
                raise CheckpointNotFoundError(
                    f"No checkpoint at {path!r}: it was deleted while being read.", path=path
                ) from exc
            raise storage_error(action, path, exc, writing=writing) from exc
