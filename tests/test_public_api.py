"""The names users type, and the error tree they catch."""

from __future__ import annotations

import torch

import torchkeep
from torchkeep import errors


def test_public_names_are_pinned() -> None:
    assert torchkeep.__all__ == sorted(torchkeep.__all__)
    assert set(torchkeep.__all__) == {
        "AnyOf",
        "CheckpointManager",
        "CheckpointRecord",
        "Compression",
        "DirectoryLockedError",
        "DistributedError",
        "KeepBest",
        "KeepEvery",
        "KeepInterval",
        "KeepLast",
        "RNGState",
        "ResumableSampler",
        "RetentionPolicy",
        "SaveHandle",
        "Cast",
        "CheckpointExistsError",
        "CheckpointInfo",
        "CheckpointNotFoundError",
        "ChecksumMismatchError",
        "CorruptCheckpointError",
        "InvalidArgumentError",
        "LoadReport",
        "LocalStorage",
        "MemoryStorage",
        "ObjectStorage",
        "Mismatch",
        "ModelVersion",
        "Registry",
        "VersionDiff",
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
        "__version__",
        "inspect",
        "load",
        "load_into",
        "register_type",
        "save",
        "verify",
    }
    for name in torchkeep.__all__:
        assert hasattr(torchkeep, name)


def test_every_error_is_a_torchkeep_error_and_a_builtin() -> None:
    builtins = {
        errors.CheckpointNotFoundError: FileNotFoundError,
        errors.CheckpointExistsError: FileExistsError,
        errors.CorruptCheckpointError: ValueError,
        errors.ChecksumMismatchError: errors.CorruptCheckpointError,
        errors.UnsupportedFormatError: ValueError,
        errors.UnsafeCheckpointError: ValueError,
        errors.UnsupportedObjectError: TypeError,
        errors.InvalidArgumentError: ValueError,
        errors.DirectoryLockedError: RuntimeError,
        errors.DistributedError: RuntimeError,
        errors.StateMismatchError: ValueError,
        errors.StorageError: OSError,
    }
    assert set(builtins) | {errors.TorchkeepError} == {getattr(errors, n) for n in errors.__all__}
    for cls, builtin in builtins.items():
        assert issubclass(cls, errors.TorchkeepError) and issubclass(cls, builtin)
        assert cls.__name__ in (errors.__doc__ or "")
    assert issubclass(errors.TorchkeepError, Exception)


def test_errors_carry_path_and_key() -> None:
    err = errors.CorruptCheckpointError("bad", path="/x", key="w")
    assert (err.path, err.key, str(err)) == ("/x", "w", "bad")
    damaged = errors.ChecksumMismatchError("bad", path="/x", damaged=["a", "b"])
    assert damaged.key == "a" and damaged.damaged == ["a", "b"]


def test_stateful_protocol_fits_torch_objects_as_they_are() -> None:
    from torch import nn

    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    for obj in (model, optimizer, scheduler, torchkeep.RNGState()):
        assert isinstance(obj, torchkeep.Stateful)
    assert not isinstance({"a": 1}, torchkeep.Stateful)


def test_every_error_survives_pickling_with_its_attributes() -> None:
    """The ranks of a distributed job send each other their errors (pickled by torch.distributed)."""
    import pickle

    from torchkeep.report import LoadReport

    made = [
        errors.ChecksumMismatchError("bad bytes", path="p", damaged=["a", "b"]),
        errors.StateMismatchError("no fit", report=LoadReport(missing=["w"]), path="p", key="model"),
        errors.StorageError("disk full", path="p"),
        *(getattr(errors, name)("message", path="p", key="k") for name in errors.__all__
          if name not in ("ChecksumMismatchError", "StateMismatchError")),
    ]  # fmt: skip
    for error in made:
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error)
        assert back.__dict__ == error.__dict__ or type(error) is errors.StateMismatchError
    assert pickle.loads(pickle.dumps(made[0])).damaged == ["a", "b"]
    assert pickle.loads(pickle.dumps(made[1])).report.missing == ["w"]
