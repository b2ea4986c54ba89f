"""The copy engine: stream stored tensors straight into existing tensors, checksummed on the way.

Extra memory stays near one tensor, never the whole checkpoint:

- a tensor whose destination is a contiguous CPU tensor of its dtype is read
  with :meth:`Storage.read_into` straight into the destination's memory, on
  several threads when there is enough to share, the checksum updated piece by
  piece; a small one (under 1 MiB) is checked, then copied, out of its shard
  mapped once;
- one going to a GPU tensor of its dtype streams in pieces through two pinned
  buffers, reading one while the other copies, several tensors at once;
- the rest (casts, non-contiguous destinations, compressed frames) go one at
  a time through a single reused staging buffer.

A large tensor read straight into its destination lands before its checksum
is known; on a mismatch the destination holds the damaged bytes and the
caller is told its key.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from torchkeep.errors import CorruptCheckpointError
from torchkeep.formats.compressed import read_compressed
from torchkeep.integrity import checksum, new_checksum
from torchkeep.storage import Storage

if TYPE_CHECKING:
    from torchkeep.formats.source import StoredTensor

__all__ = ["CopyJob", "copy_into"]

_PIECE = 4 * 1024 * 1024
#: Below this a tensor is copied out of its mapped shard; above, read with preadv in pieces.
_SMALL = 1024 * 1024
#: Off a local disk, neighbouring small tensors at most this far apart are fetched in one read.
_GAP = 256 * 1024
#: Below this much in all, reading on several threads costs more than it gains.
_PARALLEL_BYTES = 64 * 1024 * 1024
_GPU_PIECE = 16 * 1024 * 1024


@dataclass(frozen=True, eq=False)
class CopyJob:
    """Copy ``source`` (stored bytes, or a tensor already in memory) into ``dest``; ``key`` names it in reports."""

    source: StoredTensor | torch.Tensor
    dest: torch.Tensor
    key: str


class _Staging:
    """One reusable buffer for tensors that cannot be read straight into their destination."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self._pieces: list[torch.Tensor] = []

    def pieces(self) -> list[torch.Tensor]:
        """Two pinned buffers of one piece each, for overlapping file reads with copies to a GPU."""
        if not self._pieces:
            self._pieces = [torch.empty(_GPU_PIECE, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        return self._pieces

    def take(self, nbytes: int, *, pinned: bool) -> torch.Tensor:
        if self._buffer is None or self._buffer.numel() < nbytes or self._buffer.is_pinned() != pinned:
            self._buffer = None  # free the old one before allocating
            self._buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        return self._buffer[:nbytes]


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return tensor.detach().reshape(-1).view(torch.uint8).numpy().data


def _streamable(job: CopyJob, device_type: str) -> bool:
    """Whether the stored bytes can go, uncast and in order, into ``dest`` on a device of this type."""
    source, dest = job.source, job.dest
    return (
        not isinstance(source, torch.Tensor)
        and not source.compressed  # a compressed frame must be decompressed first
        and dest.device.type == device_type
        and dest.dtype == source.dtype
        and dest.is_contiguous()
    )


def copy_into(storage: Storage, jobs: list[CopyJob], *, verify: bool) -> set[str]:
    """Run every copy job; return the keys whose bytes failed their checksum.

    A tied destination (one tensor under several keys) is filled once.
    """
    by_file = sorted(
        jobs, key=lambda j: ("", 0) if isinstance(j.source, torch.Tensor) else (j.source.shard_key, j.source.start)
    )
    unique: dict[tuple[int, int], CopyJob] = {}
    for job in by_file:
        unique.setdefault((id(job.source), id(job.dest)), job)
    jobs = list(unique.values())
    direct = [j for j in jobs if _streamable(j, "cpu")]
    to_gpu = [j for j in jobs if _streamable(j, "cuda")]
    staged = [j for j in jobs if not _streamable(j, "cpu") and not _streamable(j, "cuda")]
    damaged: set[str] = set()
    small = [j for j in direct if j.dest.nbytes < _SMALL]
    large = [j for j in direct if j.dest.nbytes >= _SMALL]
    if small:
        damaged.update(_copy_small(storage, small, verify))
    if large:
        # Largest first, so the threads finish together; threads only where there is enough to share.
        large.sort(key=lambda j: -j.dest.nbytes)
        workers = min(4, os.cpu_count() or 1, len(large))
        if workers == 1 or sum(j.dest.nbytes for j in large) < _PARALLEL_BYTES:
            damaged.update(k for k in (_read_direct(storage, j, verify) for j in large) if k)
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="torchkeep-load") as pool:
                damaged.update(k for k in pool.map(lambda j: _read_direct(storage, j, verify), large) if k)
    if to_gpu:
        damaged.update(_copy_all_to_gpu(storage, to_gpu, verify))
    staging = _Staging()
    with torch.no_grad():
        for job in staged:
            if not _copy_staged(storage, job, staging, verify):
                damaged.add(job.key)
    return damaged


def _copy_small(storage: Storage, jobs: list[CopyJob], verify: bool) -> set[str]:
    """Copy small tensors out of their shards, checking each before it is copied.

    On a local disk each shard is mapped once instead of a file opened per
    tensor; elsewhere (an object store) neighbouring tensors are fetched
    together, one ranged read per run of them, and nothing else of the shard
    is read. A damaged tensor leaves its destination untouched.
    """
    damaged = set()
    for key, start, data, members in _spans(storage, jobs):
        for job in members:
            source = job.source
            assert not isinstance(source, torch.Tensor)
            offset = source.start - start
            stored = data[offset : offset + source.entry.nbytes]
            if len(stored) != source.entry.nbytes:
                raise CorruptCheckpointError(
                    f"{storage.describe(key)!r} ends before the bytes of {job.key!r}; it was truncated.",
                    path=storage.describe(key),
                    key=job.key,
                )
            if verify and source.entry.checksum and checksum(stored) != source.entry.checksum:
                damaged.add(job.key)
                continue
            _bytes_of(job.dest)[:] = stored
    return damaged


def _spans(storage: Storage, jobs: list[CopyJob]) -> Iterator[tuple[str, int, memoryview, list[CopyJob]]]:
    """``(shard key, first byte, bytes, jobs)`` for runs of neighbouring tensors, in file order."""
    ordered = sorted(jobs, key=lambda j: (j.source.shard_key, j.source.start))  # type: ignore[union-attr]
    mapped: dict[str, memoryview] = {}
    run: list[CopyJob] = []

    def flush() -> Iterator[tuple[str, int, memoryview, list[CopyJob]]]:
        first, last = run[0].source, run[-1].source
        assert not isinstance(first, torch.Tensor) and not isinstance(last, torch.Tensor)
        key, begin, end = first.shard_key, first.start, last.start + last.entry.nbytes
        if storage.local_path(key) is not None:
            if key not in mapped:
                mapped[key] = storage.map(key)
            yield key, 0, mapped[key], list(run)
        else:
            yield key, begin, memoryview(storage.read(key, begin, end - begin)), list(run)

    for job in ordered:
        source = job.source
        assert not isinstance(source, torch.Tensor)
        if run:
            last = run[-1].source
            assert not isinstance(last, torch.Tensor)
            if last.shard_key != source.shard_key or source.start - (last.start + last.entry.nbytes) > _GAP:
                yield from flush()
                run = []
        run.append(job)
    if run:
        yield from flush()


def _read_direct(storage: Storage, job: CopyJob, verify: bool) -> str | None:
    """Read bytes straight into the destination's memory; the key if they fail their checksum.

    The checksum is updated piece by piece right after each piece is read,
    while the bytes are still in the CPU cache.
    """
    source = job.source
    assert not isinstance(source, torch.Tensor)
    check = verify and bool(source.entry.checksum)
    view = _bytes_of(job.dest)
    if storage.local_path(source.shard_key) is None:
        # Off a local disk, one read of the whole tensor (the storage splits it into parallel ranged requests).
        storage.read_into(source.shard_key, source.start, view)
        return job.key if check and checksum(view) != source.entry.checksum else None
    digest = new_checksum()
    for start in range(0, len(view), _PIECE):
        piece = view[start : start + _PIECE]
        storage.read_into(source.shard_key, source.start + start, piece)
        if check:
            digest.update(piece)
    return job.key if check and digest.hexdigest() != source.entry.checksum else None


def _copy_staged(storage: Storage, job: CopyJob, staging: _Staging, verify: bool) -> bool:
    """Copy through a staging buffer (another device or dtype); False if the bytes are damaged.

    A damaged tensor leaves the destination untouched.
    """
    source, dest = job.source, job.dest
    if isinstance(source, torch.Tensor):
        dest.copy_(source)
        return True
    entry = source.entry
    if entry.nbytes == 0:
        return True
    if source.compressed:
        data = read_compressed(storage, source.shard_key, entry, path=storage.describe(source.shard_key))
        if verify and entry.checksum and checksum(data) != entry.checksum:
            return False
        dest.copy_(torch.frombuffer(data, dtype=torch.uint8).view(source.dtype).reshape(entry.shape))
        return True
    buffer = staging.take(entry.nbytes, pinned=dest.device.type == "cuda")
    view = _bytes_of(buffer)
    storage.read_into(source.shard_key, source.start, view)
    if verify and entry.checksum and checksum(view) != entry.checksum:
        return False  # dest keeps its value
    dest.copy_(buffer.view(source.dtype).reshape(entry.shape))
    return True


def _copy_all_to_gpu(storage: Storage, jobs: list[CopyJob], verify: bool) -> set[str]:
    """Several tensors at once, each thread with its own pinned pieces and CUDA stream."""
    local = threading.local()

    def send(job: CopyJob) -> str | None:
        if not hasattr(local, "staging"):
            local.staging = _Staging()
            local.stream = torch.cuda.Stream(job.dest.device)
        with torch.cuda.stream(local.stream):
            ok = _copy_to_gpu(storage, job, local.staging, verify)
        return None if ok else job.key

    workers = min(8, os.cpu_count() or 1, len(jobs))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="torchkeep-load-gpu") as pool:
        return {k for k in pool.map(send, jobs) if k is not None}


def _copy_to_gpu(storage: Storage, job: CopyJob, staging: _Staging, verify: bool) -> bool:
    """Stream one tensor to the GPU in pieces through two pinned buffers, reading one while the other copies."""
    source = job.source
    assert not isinstance(source, torch.Tensor)
    entry = source.entry
    target = job.dest.detach().reshape(-1).view(torch.uint8)
    buffers = staging.pieces()
    stream = torch.cuda.current_stream(job.dest.device)  # the thread's own stream (see _copy_all_to_gpu)
    events = [torch.cuda.Event(), torch.cuda.Event()]
    digest = new_checksum()
    for index, start in enumerate(range(0, entry.nbytes, _GPU_PIECE)):
        slot = index % 2
        if index >= 2:
            events[slot].synchronize()  # the copy out of this buffer has finished
        n = min(_GPU_PIECE, entry.nbytes - start)
        piece = buffers[slot][:n]
        view = _bytes_of(piece)
        storage.read_into(source.shard_key, source.start + start, view)
        if verify:
            digest.update(view)
        target[start : start + n].copy_(piece, non_blocking=True)
        events[slot].record(stream)
    stream.synchronize()
    return not verify or not entry.checksum or digest.hexdigest() == entry.checksum
