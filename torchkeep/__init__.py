"""torchkeep keeps PyTorch training state safe.

Save and load any state tree crash-safely, without pickle, with a checksum on
every tensor::

    import torchkeep
    torchkeep.save({"model": model.state_dict(), "step": 100}, "ckpt/step-100")
    state = torchkeep.load("ckpt/step-100")
"""

# The public names are imported on first use (PEP 562), so that ``import torchkeep``
# and the ``torchkeep`` command's --help do not pay for importing torch up front.
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from torchkeep._version import __version__

if TYPE_CHECKING:
    from torchkeep.compression import Compression
    from torchkeep.data import ResumableSampler
    from torchkeep.errors import (
        CheckpointExistsError,
        CheckpointNotFoundError,
        ChecksumMismatchError,
        CorruptCheckpointError,
        DirectoryLockedError,
        DistributedError,
        InvalidArgumentError,
        StateMismatchError,
        StorageError,
        TorchkeepError,
        UnsafeCheckpointError,
        UnsupportedFormatError,
        UnsupportedObjectError,
    )
    from torchkeep.extensions import register_type
    from torchkeep.info import CheckpointInfo, TensorInfo, VerifyReport
    from torchkeep.loading import inspect, load, verify
    from torchkeep.manager import CheckpointManager, SaveHandle
    from torchkeep.model_loading import load_into
    from torchkeep.registry import ModelVersion, Registry, VersionDiff
    from torchkeep.report import Cast, LoadReport, Mismatch
    from torchkeep.retention import (
        AnyOf,
        CheckpointRecord,
        KeepBest,
        KeepEvery,
        KeepInterval,
        KeepLast,
        RetentionPolicy,
    )
    from torchkeep.rng import RNGState
    from torchkeep.saving import save
    from torchkeep.stateful import Stateful
    from torchkeep.storage import LocalStorage, MemoryStorage, Storage, Transaction
    from torchkeep.storage.objectstore import ObjectStorage

_EXPORTS = {
    "AnyOf": "torchkeep.retention",
    "Cast": "torchkeep.report",
    "CheckpointExistsError": "torchkeep.errors",
    "CheckpointInfo": "torchkeep.info",
    "CheckpointManager": "torchkeep.manager",
    "CheckpointNotFoundError": "torchkeep.errors",
    "CheckpointRecord": "torchkeep.retention",
    "ChecksumMismatchError": "torchkeep.errors",
    "Compression": "torchkeep.compression",
    "CorruptCheckpointError": "torchkeep.errors",
    "DirectoryLockedError": "torchkeep.errors",
    "DistributedError": "torchkeep.errors",
    "InvalidArgumentError": "torchkeep.errors",
    "KeepBest": "torchkeep.retention",
    "KeepEvery": "torchkeep.retention",
    "KeepInterval": "torchkeep.retention",
    "KeepLast": "torchkeep.retention",
    "LoadReport": "torchkeep.report",
    "LocalStorage": "torchkeep.storage",
    "MemoryStorage": "torchkeep.storage",
    "ObjectStorage": "torchkeep.storage.objectstore",
    "Mismatch": "torchkeep.report",
    "ModelVersion": "torchkeep.registry",
    "RNGState": "torchkeep.rng",
    "Registry": "torchkeep.registry",
    "ResumableSampler": "torchkeep.data",
    "RetentionPolicy": "torchkeep.retention",
    "SaveHandle": "torchkeep.manager",
    "StateMismatchError": "torchkeep.errors",
    "Stateful": "torchkeep.stateful",
    "Storage": "torchkeep.storage",
    "StorageError": "torchkeep.errors",
    "TensorInfo": "torchkeep.info",
    "TorchkeepError": "torchkeep.errors",
    "Transaction": "torchkeep.storage",
    "UnsafeCheckpointError": "torchkeep.errors",
    "UnsupportedFormatError": "torchkeep.errors",
    "UnsupportedObjectError": "torchkeep.errors",
    "VerifyReport": "torchkeep.info",
    "VersionDiff": "torchkeep.registry",
    "inspect": "torchkeep.loading",
    "load": "torchkeep.loading",
    "load_into": "torchkeep.model_loading",
    "register_type": "torchkeep.extensions",
    "save": "torchkeep.saving",
    "verify": "torchkeep.loading",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'torchkeep' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AnyOf",
    "Cast",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointRecord",
    "ChecksumMismatchError",
    "Compression",
    "CorruptCheckpointError",
    "DirectoryLockedError",
    "DistributedError",
    "InvalidArgumentError",
    "KeepBest",
    "KeepEvery",
    "KeepInterval",
    "KeepLast",
    "LoadReport",
    "LocalStorage",
    "MemoryStorage",
    "Mismatch",
    "ModelVersion",
    "ObjectStorage",
    "RNGState",
    "Registry",
    "ResumableSampler",
    "RetentionPolicy",
    "SaveHandle",
    "StateMismatchError",
    "Stateful",
    "Storage",
    "StorageError",
    "TensorInfo",
    "TorchkeepError",
    "Transaction",
    "UnsafeCheckpointError",
    "UnsupportedFormatError",
    "UnsupportedObjectError",
    "VerifyReport",
    "VersionDiff",
    "__version__",
    "inspect",
    "load",
    "load_into",
    "register_type",
    "save",
    "verify",
]
