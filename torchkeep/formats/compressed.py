"""Compressed shards: one independent zstd frame per tensor, so any tensor is read on its own.

A compressed shard has no header; the manifest gives each tensor's frame
(``offsets``), its size uncompressed (``nbytes``), whether its bytes were
shuffled (``shuffle``, the element size) and the checksum of the uncompressed
bytes. Such shards are read into private memory, not mapped.
"""

from __future__ import annotations

from typing import BinaryIO

from torchkeep.compression import Compression, compressor, decompress, unshuffle
from torchkeep.compression import shuffle as shuffle_bytes
from torchkeep.errors import CorruptCheckpointError
from torchkeep.formats.shard import PlannedTensor, leaf_bytes
from torchkeep.integrity import checksum
from torchkeep.manifest import TensorEntry
from torchkeep.storage import Storage

__all__ = ["read_compressed", "write_compressed_shard"]


def write_compressed_shard(
    f: BinaryIO, planned: list[PlannedTensor], shard: str, compression: Compression
) -> tuple[list[TensorEntry], int]:
    """Write each tensor as its own zstd frame; checksums cover the uncompressed bytes."""
    zstd = compressor(compression.level)
    entries = []
    position = 0
    for p in planned:
        data = leaf_bytes(p.leaf.value)
        itemsize = p.nbytes // max(1, _numel(p.shape)) if p.nbytes else 0
        stride = itemsize if compression.shuffle and itemsize > 1 and not p.raw else 0
        frame = zstd.compress(shuffle_bytes(data, stride) if stride else data)
        f.write(frame)
        entries.append(
            TensorEntry(
                name=p.name, kind=p.kind, dtype=p.dtype, shape=p.shape, nbytes=p.nbytes, shard=shard,
                offsets=(position, position + len(frame)), checksum=checksum(data), device=p.device, shuffle=stride,
            )
        )  # fmt: skip
        position += len(frame)
    return entries, position


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def read_compressed(storage: Storage, key: str, entry: TensorEntry, *, path: str) -> memoryview:
    """The uncompressed bytes of one tensor of a compressed shard, writable (checksum not yet checked)."""
    begin, end = entry.offsets
    size = storage.size(key)
    if end > size:
        raise CorruptCheckpointError(
            f"Tensor {entry.name!r} of {path!r} lies at bytes {begin}..{end} of a {size}-byte shard; "
            "the shard is truncated.",
            path=path,
            key=entry.name,
        )
    try:
        data = decompress(storage.read(key, begin, end - begin), entry.nbytes)
    except CorruptCheckpointError:
        raise
    except Exception as exc:  # zstandard raises its own ZstdError for damaged frames
        raise CorruptCheckpointError(
            f"Tensor {entry.name!r} of {path!r} does not decompress ({exc}); the shard is damaged.",
            path=path,
            key=entry.name,
        ) from exc
    if len(data) != entry.nbytes:
        raise CorruptCheckpointError(
            f"Tensor {entry.name!r} of {path!r} decompresses to {len(data)} bytes, not {entry.nbytes}.",
            path=path,
            key=entry.name,
        )
    return unshuffle(data, entry.shuffle)
