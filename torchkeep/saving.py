"""``torchkeep.save``: any state tree to a native checkpoint, a .safetensors or a .pth file."""

from __future__ import annotations

import collections
import dataclasses
import errno
import os
from dataclasses import dataclass
from typing import Any

import torch

from torchkeep.compression import Compression
from torchkeep.errors import CheckpointExistsError, InvalidArgumentError, StorageError, TorchkeepError
from torchkeep.formats.detect import Format
from torchkeep.formats.native import DEFAULT_MAX_SHARD_SIZE, write_native
from torchkeep.formats.pth import write_pth
from torchkeep.formats.safetensors_file import write_safetensors
from torchkeep.formats.shard import PlannedTensor, plan_tensors
from torchkeep.gcpause import paused_gc
from torchkeep.manifest import MANIFEST_NAME, Manifest, check_metadata
from torchkeep.progress import Progress, Tally, counting_storage
from torchkeep.storage import Storage, join_key, resolve
from torchkeep.tree import encode_tree

__all__ = ["SaveJob", "prepare_save", "save", "write_job"]


def _check_target(storage: Storage, key: str, fmt: Format) -> None:
    """Refuse to replace anything that is not a checkpoint of the same shape."""
    if not storage.exists(key):
        return
    where = storage.describe(key)
    if storage.is_dir(key):
        if fmt == Format.NATIVE and (not storage.list(key) or storage.exists(join_key(key, MANIFEST_NAME))):
            return
        raise CheckpointExistsError(
            f"{where!r} is a directory that is not a torchkeep checkpoint; it is left untouched. "
            "Remove it or save to another path.",
            path=where,
        )
    if fmt == Format.NATIVE:
        raise CheckpointExistsError(
            f"{where!r} is a file, and a native checkpoint is a directory; the file is left untouched. "
            "Remove it, save to another path, or add .safetensors or .pth to the name for a single file.",
            path=where,
        )


@dataclass(frozen=True)
class SaveJob:
    """A save that has been validated and planned, ready to be snapshotted and written.

    The stages of every save, shared by the synchronous and asynchronous paths:
    :func:`prepare_save` (gather and plan: validate the tree, refuse what
    cannot be saved, work out the layout; nothing is written), an optional
    snapshot (:class:`torchkeep.snapshot.StagingBuffer` copies the tensors
    aside, so training may go on), then :func:`write_job` (write, checksum,
    commit). A job is never changed once planned: the snapshot makes a copy
    of it (``dataclasses.replace``) that points at the staged tensors.
    """

    storage: Storage
    key: str
    fmt: Format
    obj: Any
    tree: Any
    planned: list[PlannedTensor]
    metadata: dict[str, Any]
    max_shard_size: int
    compression: Compression | None = None
    objects: str | None = None  # a manager's object folder: share unchanged tensors (incremental)


def prepare_save(
    obj: Any,
    path: str | os.PathLike[str],
    *,
    metadata: dict[str, Any] | None = None,
    compression: str | Compression | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    objects: str | None = None,
    storage: Storage | None = None,
) -> SaveJob:
    """Validate and plan a save; raises before anything is written.

    ``objects`` is the key of a manager's object folder, where an incremental
    checkpoint shares unchanged tensors. See :func:`save` for the other arguments.
    """
    codec = Compression.parse(compression)
    if type(max_shard_size) is not int or max_shard_size <= 0:
        raise InvalidArgumentError(f"max_shard_size must be a positive int of bytes, not {max_shard_size!r}.")
    st, key = resolve(path, storage)
    fmt = Format.for_path(key)
    meta = check_metadata(metadata)
    if (codec is not None or objects is not None) and fmt != Format.NATIVE:
        raise InvalidArgumentError(
            f"compression and shared objects are for native checkpoints; a {fmt} file cannot hold them. "
            "Save to a path without .safetensors/.pth, or drop compression."
        )
    if fmt == Format.TORCH_ZIP and meta:
        raise InvalidArgumentError(
            "A .pth file has no place for metadata; save to a native checkpoint or a .safetensors file, "
            "or put the values inside the saved dict."
        )
    with paused_gc():
        tree, leaves = encode_tree(obj, numpy_ok=fmt != Format.TORCH_ZIP, in_manifest=fmt != Format.TORCH_ZIP)
        planned = plan_tensors(leaves)
    _check_target(st, key, fmt)
    return SaveJob(st, key, fmt, obj, tree, planned, meta, max_shard_size, codec, objects)


def write_job(job: SaveJob) -> Manifest | None:
    """Write a prepared save and commit it atomically; nothing is published if it fails.

    Returns the committed manifest (None for a ``.pth``, which has none).

    An ``OSError`` from a storage backend that did not translate it is reported
    as a :class:`StorageError` naming the checkpoint.
    """
    try:
        return _write(job)
    except TorchkeepError:
        raise
    except OSError as exc:
        where = job.storage.describe(job.key)
        reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise StorageError(
            f"Could not save {where!r}: {reason}. Earlier checkpoints are untouched.", path=where
        ) from exc


def _write(job: SaveJob) -> Manifest | None:
    if job.fmt == Format.TORCH_ZIP:
        write_pth(job.storage, job.key, _compact(job.obj, {}))
        return None
    if job.fmt == Format.SAFETENSORS:
        return write_safetensors(job.storage, job.key, job.tree, job.planned, job.metadata)
    return write_native(
        job.storage, job.key, job.tree, job.planned, job.metadata,
        max_shard_size=job.max_shard_size, compression=job.compression, objects=job.objects,
    )  # fmt: skip


def _compact(obj: Any, memo: dict[int, Any]) -> Any:
    """The tree with each tensor that views part of a larger storage copied to a storage of its own.

    ``torch.save`` writes a tensor's whole storage, so a 5-element slice of a
    40 MB buffer would carry the 40 MB, values the caller never meant to
    save, into the file. A tensor met twice (tied) stays one tensor.
    """
    if isinstance(obj, torch.Tensor):
        if id(obj) in memo:
            return memo[id(obj)]
        nbytes = obj.numel() * obj.element_size()
        copy = obj
        if obj.layout == torch.strided and obj.untyped_storage().nbytes() > nbytes:
            data = obj.detach().clone(memory_format=torch.contiguous_format)
            copy = (
                torch.nn.Parameter(data, requires_grad=obj.requires_grad)
                if isinstance(obj, torch.nn.Parameter)
                else data
            )
        memo[id(obj)] = copy
        return copy
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) in (dict, collections.OrderedDict) else dict()
        for key, value in obj.items():
            out[key] = _compact(value, memo)
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata  # type: ignore[attr-defined]
        return out
    if type(obj) in (list, tuple):
        return type(obj)(_compact(v, memo) for v in obj)
    return obj


def save(
    obj: Any,
    path: str | os.PathLike[str],
    *,
    metadata: dict[str, Any] | None = None,
    compression: str | Compression | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    progress: Progress | None = None,
    storage: Storage | None = None,
) -> None:
    """Save a state tree atomically; the format follows the path.

    ``NAME.safetensors`` writes one safetensors file (the tree and checksums in
    its header metadata), ``NAME.pth``, ``.pt``, ``.bin`` or ``.ckpt`` a torch
    zip that ``torch.load(path, weights_only=True)`` opens, and a path without
    a suffix a native checkpoint directory (another suffix is refused). The
    new checkpoint appears at ``path`` only when it is complete and fsync'd;
    an existing one there stays whole until then.

    Args:
        obj: dicts (str or int keys), lists and tuples of tensors, numpy arrays,
            int, float, bool, str, bytes, None, torch.dtype, torch.device and
            torch.Size. Identical views of one storage (tied weights) are stored once.
        path: a file or directory path, or a URL (``memory://store/key``).
        metadata: plain JSON kept with the checkpoint (not for ``.pth``).
        compression: ``"zstd"``, ``"zstd:LEVEL"`` or a :class:`Compression`, for native
            checkpoints: each tensor is byte-shuffled and compressed on its own
            (format version 2; needs the ``zstd`` extra). Loading decompresses
            transparently; such tensors are read into memory rather than mapped.
        max_shard_size: bytes of tensor data per shard file in a native checkpoint.
        progress: called as ``progress(done_bytes, total_bytes)`` while the data is
            written (see :mod:`torchkeep.progress`).
        storage: write into this storage, with ``path`` as the key.

    Raises:
        UnsupportedObjectError: a value cannot be saved; the message names its place.
        CheckpointExistsError: ``path`` holds data that is not a checkpoint.
        StorageError: writing failed (disk full, permissions); nothing is left behind.

    Example:
        >>> torchkeep.save({"model": model.state_dict(), "epoch": 3}, "ckpt/epoch-3")
    """
    job = prepare_save(
        obj, path, metadata=metadata, compression=compression, max_shard_size=max_shard_size, storage=storage
    )
    if progress is None:
        write_job(job)
        return
    tally = Tally(sum(p.nbytes for p in job.planned), progress)
    write_job(dataclasses.replace(job, storage=counting_storage(job.storage, tally)))
    tally.finish()
