"""Reading and checking the tensors a manifest describes, for every safetensors-based format."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from torchkeep.errors import ChecksumMismatchError, CorruptCheckpointError
from torchkeep.formats.compressed import read_compressed
from torchkeep.formats.objects import OBJECT_TENSOR
from torchkeep.formats.shard import ShardHeader, materialize, read_header
from torchkeep.integrity import checksum
from torchkeep.manifest import Manifest, TensorEntry
from torchkeep.storage import Storage

__all__ = ["OpenedCheckpoint", "checksums", "read_arrays"]


@dataclass(frozen=True)
class OpenedCheckpoint:
    """A checkpoint whose manifest has been read: where it is and where its shards are.

    Foreign safetensors files get a manifest made up from their headers, with
    empty checksums (they carry none).
    """

    format: str
    path: str
    manifest: Manifest
    shard_keys: dict[str, str]
    compressed: frozenset[str] = frozenset()  # shards of zstd frames rather than safetensors
    shared: frozenset[str] = frozenset()  # one-tensor shards in the manager's object folder


def read_arrays(
    storage: Storage,
    opened: OpenedCheckpoint,
    *,
    verify: bool,
    build: bool = True,
    names: set[str] | None = None,
) -> tuple[dict[str, torch.Tensor | np.ndarray], int]:
    """Map the shards and view each tensor in place, checking checksums when ``verify``.

    With ``build=False`` nothing is built: only the checks run (what ``verify`` needs).
    Every damaged tensor is collected before raising, so one error names them all.

    Returns:
        The arrays by name and the number of bytes checked.

    Raises:
        ChecksumMismatchError: one or more tensors' bytes do not match their checksums.
        CorruptCheckpointError: a shard is missing, truncated or disagrees with the manifest.
    """
    headers: dict[str, ShardHeader] = {}
    buffers: dict[str, memoryview] = {}
    located: list[tuple[TensorEntry, memoryview, int, int]] = []
    packed: list[tuple[TensorEntry, str]] = []
    # File order, so the shards are read front to back.
    for entry in sorted(opened.manifest.tensors, key=lambda e: (e.shard, e.offsets[0])):
        if names is not None and entry.name not in names:
            continue
        key = opened.shard_keys.get(entry.shard)
        if key is None:
            raise CorruptCheckpointError(
                f"Tensor {entry.name!r} in {opened.path!r} points to shard {entry.shard!r}, "
                "which the checkpoint does not list.",
                path=opened.path,
                key=entry.name,
            )
        if entry.shard in opened.compressed:
            packed.append((entry, key))
            continue
        if key not in headers:
            headers[key] = read_header(storage, key)
            buffers[key] = storage.map(key)
        header = headers[key]
        stored = header.tensors.get(OBJECT_TENSOR if entry.shard in opened.shared else entry.name)
        if stored is None or list(stored["data_offsets"]) != list(entry.offsets):
            raise CorruptCheckpointError(
                f"Tensor {entry.name!r} is described differently by the manifest and by shard "
                f"{storage.describe(key)!r}; the checkpoint is damaged.",
                path=storage.describe(key),
                key=entry.name,
            )
        start = header.data_start + entry.offsets[0]
        end = header.data_start + entry.offsets[1]
        if end - start != entry.nbytes:
            raise CorruptCheckpointError(
                f"Tensor {entry.name!r} in {opened.path!r} spans {end - start} bytes but should hold "
                f"{entry.nbytes}; the manifest is damaged.",
                path=opened.path,
                key=entry.name,
            )
        located.append((entry, buffers[key], start, end))

    checked = [item for item in located if verify and item[0].checksum]
    digests = checksums([buf[start:end] for _, buf, start, end in checked])
    damaged = [entry.name for (entry, *_), digest in zip(checked, digests, strict=True) if digest != entry.checksum]
    arrays: dict[str, torch.Tensor | np.ndarray] = {}
    checked_bytes = sum(entry.nbytes for entry, *_ in checked)
    for entry, key in packed:  # compressed: read, decompress and check one tensor at a time
        data = read_compressed(storage, key, entry, path=opened.path)
        if verify and entry.checksum:
            if checksum(data) != entry.checksum:
                damaged.append(entry.name)
                continue
            checked_bytes += entry.nbytes
        if build:
            arrays[entry.name] = materialize(data, 0, entry, path=opened.path)
    if build and not damaged:
        for entry, buf, start, _ in located:
            arrays[entry.name] = materialize(buf, start, entry, path=opened.path)
    if damaged:
        listed = ", ".join(repr(n) for n in damaged[:20]) + (
            f" and {len(damaged) - 20} more" if len(damaged) > 20 else ""
        )
        raise ChecksumMismatchError(
            f"{opened.path!r} is damaged: {len(damaged)} tensor(s) fail their checksum: {listed}. "
            "Restore the checkpoint from a good copy, or load an earlier one.",
            path=opened.path,
            damaged=damaged,
        )
    return arrays, checked_bytes


_PARALLEL_BYTES = 64 * 1024 * 1024


def checksums(views: list[memoryview]) -> list[str]:
    """Checksums of many buffers, on several threads when there is enough to gain (xxhash drops the GIL)."""
    total = sum(v.nbytes for v in views)
    workers = min(4, os.cpu_count() or 1)
    if total < _PARALLEL_BYTES or workers == 1:
        return [checksum(v) for v in views]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="torchkeep-verify") as pool:
        return list(pool.map(checksum, views))
