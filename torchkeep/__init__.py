"""torchkeep keeps PyTorch training state safe.

Save and load any state tree crash-safely, without pickle, with a checksum on
every tensor::

    import torchkeep
    torchkeep.save({"model": model.state_dict(), "step": 100}, "ckpt/step-100")
    state = torchkeep.load("ckpt/step-100")
"""

from torchkeep._version import __version__
from torchkeep.compression import Compression
from torchkeep.data import ResumableSampler
from torchkeep.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    DirectoryLockedError,
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
