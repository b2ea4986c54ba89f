"""The native checkpoint: a directory of safetensors shards with ``manifest.json`` written last."""

from __future__ import annotations

import os
from typing import Any

from torchkeep.compression import Compression
from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError
from torchkeep.formats.compressed import write_compressed_shard
from torchkeep.formats.detect import Format
from torchkeep.formats.objects import OBJECTS, is_object_name, store_object
from torchkeep.formats.shard import PlannedTensor, tree_order, write_shard
from torchkeep.formats.source import ManifestSource
from torchkeep.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, ShardEntry, TensorEntry
from torchkeep.storage import Storage, join_key, parent_key

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "open_native", "read_manifest", "write_native"]

#: Shards are cut at this many bytes of tensor data (one tensor never spans two).
DEFAULT_MAX_SHARD_SIZE = 4 * 1024**3
#: In an incremental checkpoint, tensors this large are shared by content; smaller
#: ones (biases, norms, steps) are cheaper to rewrite than to keep as separate files.
SHARE_MIN_BYTES = 64 * 1024


def _split(planned: list[PlannedTensor], max_shard_size: int) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for p in planned:
        if shards[-1] and size + p.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return shards


def write_native(
    storage: Storage,
    key: str,
    tree: Any,
    planned: list[PlannedTensor],
    metadata: dict[str, Any],
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    compression: Compression | None = None,
    objects: str | None = None,
) -> Manifest:
    """Write shards, then the manifest, then commit; on any failure nothing is published.

    With ``objects`` (the key of a manager's object folder), every tensor of at
    least :data:`SHARE_MIN_BYTES` is stored there by content instead, and only
    written if those bytes are not there yet (an incremental checkpoint).

    Returns:
        The manifest that was committed.
    """
    entries: list[TensorEntry] = []
    shards: list[ShardEntry] = []
    if objects is not None:
        # Objects first: the checkpoint that refers to them is committed only after they are durable.
        for p in [p for p in planned if p.nbytes >= SHARE_MIN_BYTES]:
            entry, shard, _ = store_object(storage, objects, p)
            entries.append(entry)
            if shard.file not in {s.file for s in shards}:
                shards.append(shard)
        planned_here = [p for p in planned if p.nbytes < SHARE_MIN_BYTES]
    else:
        planned_here = planned
    with storage.begin(key, directory=True) as txn:
        for index, group in enumerate(_split(planned_here, max_shard_size)):
            if compression is None:
                name = f"data-{index:05d}.safetensors"
                with txn.open(name) as f:
                    written, size = write_shard(f, group, name, {"format": "pt"})
            else:
                name = f"data-{index:05d}.zst"
                with txn.open(name) as f:
                    written, size = write_compressed_shard(f, group, name, compression)
            entries.extend(written)
            shards.append(
                ShardEntry(file=name, size=size, compression=None if compression is None else compression.codec)
            )
        manifest = Manifest(
            tree=tree,
            tensors=tree_order(entries, planned),
            shards=tuple(shards),
            metadata=metadata,
            format_version=1 if compression is None and objects is None else 2,
        )
        with txn.open(MANIFEST_NAME) as f:
            f.write(manifest.to_bytes())
    return manifest


def read_manifest(storage: Storage, key: str) -> Manifest:
    """Read and validate only the manifest of the native checkpoint at ``key``.

    Raises:
        CheckpointNotFoundError: the directory has no manifest (never committed).
        CorruptCheckpointError: the manifest is damaged.
        UnsupportedFormatError: the manifest is from a newer format version.
    """
    path = storage.describe(key)
    manifest_key = join_key(key, MANIFEST_NAME)
    if not storage.exists(manifest_key):
        raise CheckpointNotFoundError(
            f"{path!r} has no {MANIFEST_NAME}, so it is not a committed checkpoint "
            "(a save that was interrupted leaves none).",
            path=path,
        )
    return Manifest.from_bytes(read_manifest_bytes(storage, manifest_key, path, "manifest"), path=path)


def read_manifest_bytes(storage: Storage, key: str, path: str, what: str) -> bytes:
    """The bytes of a manifest-like file at ``key`` of the checkpoint at ``path``: never a link, never oversized."""
    local = storage.local_path(key)
    if local is not None and os.path.islink(local):
        raise CorruptCheckpointError(
            f"The {what} of {path!r} is a symbolic link; torchkeep does not follow links out of a checkpoint.",
            path=local,
        )
    size = storage.size(key)
    if size > MAX_MANIFEST_BYTES:
        raise CorruptCheckpointError(
            f"The {what} of {path!r} is {size} bytes, over the {MAX_MANIFEST_BYTES}-byte limit.", path=path
        )
    return storage.read(key)


def open_native(storage: Storage, key: str) -> ManifestSource:
    """Read and validate the manifest of the native checkpoint at ``key``.

    Raises:
        CheckpointNotFoundError: the directory has no manifest (never committed).
        CorruptCheckpointError: the manifest is damaged or a shard is missing or truncated.
        UnsupportedFormatError: the manifest is from a newer format version.
    """
    path = storage.describe(key)
    manifest = read_manifest(storage, key)
    shard_keys = {}
    parent = parent_key(key)
    for shard in manifest.shards:
        if shard.shared and not is_object_name(shard.file):
            raise CorruptCheckpointError(
                f"The manifest of {path!r} names shared shard {shard.file!r}, which is not an object name.",
                path=path,
            )
        if "/" in shard.file or shard.file in ("", ".", "..", MANIFEST_NAME) or "\x00" in shard.file:
            raise CorruptCheckpointError(
                f"The manifest of {path!r} names shard {shard.file!r}, which is not a file inside the checkpoint.",
                path=path,
            )
        shard_key = join_key(parent, OBJECTS, shard.file) if shard.shared else join_key(key, shard.file)
        if not storage.exists(shard_key):
            raise CorruptCheckpointError(
                f"Shard {shard.file!r} of {path!r} is missing; the checkpoint is incomplete.", path=path
            )
        local = storage.local_path(shard_key)
        if local is not None and os.path.islink(local):
            raise CorruptCheckpointError(
                f"Shard {shard.file!r} of {path!r} is a symbolic link; torchkeep does not follow links out of "
                "a checkpoint. Replace it with the file itself.",
                path=local,
            )
        actual = storage.size(shard_key)
        if actual != shard.size:
            raise CorruptCheckpointError(
                f"Shard {shard.file!r} of {path!r} is {actual} bytes but should be {shard.size}; "
                "it was truncated or overwritten.",
                path=storage.describe(shard_key),
            )
        shard_keys[shard.file] = shard_key
    compressed = frozenset(s.file for s in manifest.shards if s.compression)
    shared = frozenset(s.file for s in manifest.shards if s.shared)
    return ManifestSource(Format.NATIVE, path, storage, manifest, shard_keys, compressed=compressed, shared=shared)
