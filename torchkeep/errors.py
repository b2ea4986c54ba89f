"""The exceptions torchkeep raises.

Every error is a :class:`TorchkeepError`, so ``except torchkeep.TorchkeepError``
catches all of them. Leaves also subclass the built-in a caller would expect,
so code written against plain ``open``/``torch.load`` keeps working::

    TorchkeepError(Exception)
    ├── CheckpointNotFoundError(FileNotFoundError)   nothing committed at the path
    ├── CheckpointExistsError(FileExistsError)       refusing to replace non-checkpoint data
    ├── CorruptCheckpointError(ValueError)           bytes or structure are damaged
    │   └── ChecksumMismatchError                    a tensor's bytes fail their checksum
    ├── UnsupportedFormatError(ValueError)           unknown format, or a newer format version
    ├── UnsafeCheckpointError(ValueError)            would need to run pickled code to load
    ├── UnsupportedObjectError(TypeError)            a value in the tree cannot be saved
    ├── StateMismatchError(ValueError)               checkpoint and target do not line up (load_into)
    ├── InvalidArgumentError(ValueError)             a bad argument to a torchkeep call
    ├── DirectoryLockedError(RuntimeError)           another manager is writing to the directory
    ├── DistributedError(RuntimeError)               another rank failed, died or did not answer
    └── StorageError(OSError)                        the storage backend failed (disk full, I/O)

Errors carry the path of the file (``.path``) and, where one applies, the key
of the tensor or the place in the tree (``.key``).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "ChecksumMismatchError",
    "CorruptCheckpointError",
    "DirectoryLockedError",
    "DistributedError",
    "InvalidArgumentError",
    "StateMismatchError",
    "StorageError",
    "TorchkeepError",
    "UnsafeCheckpointError",
    "UnsupportedFormatError",
    "UnsupportedObjectError",
]


class TorchkeepError(Exception):
    """Root of every error torchkeep raises.

    Attributes:
        path: the file or checkpoint concerned, or None.
        key: the tensor name or tree location concerned, or None.
    """

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.key = key

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled whole (the ranks of a distributed job send each other their errors): the default
        # rebuilds from args alone, which misses the keyword-only attributes of the subclasses.
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


def _rebuild(cls: type[TorchkeepError], message: str, state: dict[str, Any]) -> TorchkeepError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class CheckpointNotFoundError(TorchkeepError, FileNotFoundError):
    """No committed checkpoint exists at the path."""


class CheckpointExistsError(TorchkeepError, FileExistsError):
    """The target holds data that is not a checkpoint, so it is not replaced."""


class CorruptCheckpointError(TorchkeepError, ValueError):
    """The checkpoint's bytes or structure are damaged (truncated, garbage, inconsistent)."""


class ChecksumMismatchError(CorruptCheckpointError):
    """One or more tensors' bytes do not match their recorded checksums.

    Attributes:
        damaged: the names of every tensor that failed, in file order.
    """

    def __init__(self, message: str, *, path: str | None = None, damaged: list[str]) -> None:
        super().__init__(message, path=path, key=damaged[0] if damaged else None)
        self.damaged = damaged


class UnsupportedFormatError(TorchkeepError, ValueError):
    """The file is not in a format torchkeep reads, or was written by a newer format version."""


class UnsafeCheckpointError(TorchkeepError, ValueError):
    """Loading would need to unpickle arbitrary Python objects, which torchkeep refuses."""


class UnsupportedObjectError(TorchkeepError, TypeError):
    """A value in the state tree cannot be saved without pickle."""


class StateMismatchError(TorchkeepError, ValueError):
    """The checkpoint does not line up with the target it is loaded into.

    Attributes:
        report: the :class:`~torchkeep.report.LoadReport`, listing every problem.
    """

    def __init__(self, message: str, *, report: Any, path: str | None = None, key: str | None = None) -> None:
        super().__init__(message, path=path, key=key)
        self.report = report


class InvalidArgumentError(TorchkeepError, ValueError):
    """An argument to a torchkeep call is not valid."""


class StorageError(TorchkeepError, OSError):
    """The storage backend failed to read, write, commit or delete."""


class DistributedError(TorchkeepError, RuntimeError):
    """Another rank of a distributed save or restore failed, died, or did not answer within the timeout.

    Nothing was committed by the save that raised it (unless the message says the
    commit was already made); every rank of the job gets this error, not a hang.
    """


class DirectoryLockedError(TorchkeepError, RuntimeError):
    """Another CheckpointManager (in this process or another) is writing to the same directory."""
