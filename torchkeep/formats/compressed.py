"""Compressed shards: one independent zstd frame per tensor, so any tensor is read on its own.

A compressed shard has no header; the manifest gives each tensor's frame
(``offsets``), its size uncompressed (``nbytes``), whether its bytes were
shuffled (``shuffle``, the element size) and the checksum of the uncompressed
bytes. Such shards are read into private memory, not mapped.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

from torchkeep.compression import Compression, compressor, decompress, unshuffle
from torchkeep.compression import shuffle as shuffle_bytes
from torchkeep.errors import CorruptCheckpointError
from torchkeep.formats.shard import PlannedTensor, leaf_bytes
from torchkeep.integrity import checksum
from torchkeep.manifest import TensorEntry
from torchkeep.storage import Storage

__all__ = ["read_compressed", "write_compressed_shard"]

_LARGE = 8 * 1024 * 1024
_SAMPLE = 256 * 1024
T = TypeVar("T")
R = TypeVar("R")


def write_compressed_shard(
    f: BinaryIO, planned: list[PlannedTensor], shard: str, compression: Compression
) -> tuple[list[TensorEntry], int]:
    """Write each tensor as its own zstd frame; checksums cover the uncompressed bytes.

    Tensors are compressed on several threads at once (zstd and xxhash release
    the GIL), a few at a time so memory stays bounded, and written in order.
    """
    workers = max(1, min(8, os.cpu_count() or 1))

    def pack(p: PlannedTensor) -> tuple[bytes, str, int]:
        data = leaf_bytes(p.leaf.value)
        stride = p.itemsize if compression.shuffle and p.itemsize > 1 and not p.raw else 0
        if stride and len(data) > _SAMPLE and not _shuffle_helps(data, stride, compression.level):
            stride = 0
        threads = workers if p.nbytes >= _LARGE else 0  # a large tensor's frame is compressed on all cores
        frame = compressor(compression.level, threads).compress(shuffle_bytes(data, stride) if stride else data)
        return frame, checksum(data), stride

    entries = []
    position = 0
    for start in range(0, len(planned), 2 * workers):
        batch = planned[start : start + 2 * workers]
        for p, (frame, digest, stride) in zip(batch, _parallel(pack, batch, workers), strict=True):
            f.write(frame)
            entries.append(
                TensorEntry(
                    name=p.name, kind=p.kind, dtype=p.dtype, shape=p.shape, nbytes=p.nbytes, shard=shard,
                    offsets=(position, position + len(frame)), checksum=digest, device=p.device, shuffle=stride,
                )
            )  # fmt: skip
            position += len(frame)
    return entries, position


def _parallel(fn: Callable[[T], R], items: list[T], workers: int) -> list[R]:
    """``[fn(x) for x in items]`` on plain threads (usable while the interpreter shuts down)."""
    if workers == 1 or len(items) == 1:
        return [fn(x) for x in items]
    results: list[Any] = [None] * len(items)
    errors: list[BaseException] = []

    def run(indices: range) -> None:
        try:
            for i in indices:
                results[i] = fn(items[i])
        except BaseException as exc:  # re-raised in the caller below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(range(w, len(items), workers),)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _shuffle_helps(data: memoryview, stride: int, level: int) -> bool:
    """Compress a sample both ways: shuffling wins on dense floats and loses on mostly-zero data."""
    sample = data[: _SAMPLE - _SAMPLE % stride]
    zstd = compressor(level)
    return len(zstd.compress(shuffle_bytes(sample, stride))) < len(zstd.compress(sample))


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
