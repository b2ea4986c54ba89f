"""The safetensors byte layout, shared by native shards and single ``.safetensors`` files.

A shard is ``u64 little-endian header length`` + ``JSON header`` (padded with
spaces to a multiple of 8) + tensor bytes. Any safetensors reader opens it.
Tensors are ordered by alignment (8-byte element types first) so that every
tensor starts at a multiple of its element size, which lets a loader view
the mapped bytes as the tensor's dtype in place. A dtype that safetensors
readers do not know (complex128, float4, bits types, numpy strings) is stored
as raw bytes (``"U8"``); its real dtype is in the torchkeep manifest.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, BinaryIO, Literal

import msgspec
import numpy as np
import torch

from torchkeep.dtypes import (
    numpy_dtype_from_name,
    safetensors_code,
    safetensors_numpy_code,
    torch_dtype_from_name,
    torch_dtype_name,
)
from torchkeep.errors import CorruptCheckpointError, UnsupportedFormatError, UnsupportedObjectError
from torchkeep.gcpause import paused_gc
from torchkeep.integrity import checksum
from torchkeep.manifest import TensorEntry, strict_json
from torchkeep.storage import Storage
from torchkeep.tree import ArrayLeaf

__all__ = ["PlannedTensor", "ShardHeader", "leaf_bytes", "plan_tensors", "read_header", "write_shard"]

MAX_HEADER_BYTES = 100 * 1024 * 1024
_CODE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "C64": 8,
}  # fmt: skip


@dataclass(eq=False, slots=True)
class PlannedTensor:
    """A leaf with its dtype, shape and byte size worked out, before any data is copied."""

    leaf: ArrayLeaf
    kind: Literal["torch", "numpy"]
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    code: str
    raw: bool
    itemsize: int
    device: str
    order: int = 0

    @property
    def name(self) -> str:
        return self.leaf.name

    @property
    def align(self) -> int:
        """The alignment its bytes get in a shard: the largest power of two dividing its element size, up to 8."""
        return math.gcd(self.itemsize, 8) if self.itemsize else 1


def plan_tensors(leaves: list[ArrayLeaf]) -> list[PlannedTensor]:
    """Describe each leaf and order them for the shard layout (largest alignment first)."""
    planned = []
    for leaf in leaves:
        value = leaf.value
        if isinstance(value, torch.Tensor):
            code = safetensors_code(value.dtype)
            itemsize = value.dtype.itemsize
            planned.append(
                PlannedTensor(
                    leaf, "torch", torch_dtype_name(value.dtype), tuple(value.shape),
                    value.numel() * itemsize, code or "U8", code is None, itemsize, str(value.device),
                )
            )  # fmt: skip
        else:
            code = safetensors_numpy_code(value.dtype)
            planned.append(
                PlannedTensor(
                    leaf, "numpy", value.dtype.str, tuple(value.shape), value.nbytes,
                    code or "U8", code is None, value.dtype.itemsize, "cpu",
                )
            )  # fmt: skip
    for order, p in enumerate(planned):
        p.order = order
    planned.sort(key=lambda p: -p.align)
    return planned


def tree_order(entries: list[TensorEntry], planned: list[PlannedTensor]) -> tuple[TensorEntry, ...]:
    """Entries in the order their leaves appear in the tree, for a manifest a person reads."""
    rank = {p.name: p.order for p in planned}
    return tuple(sorted(entries, key=lambda e: rank[e.name]))


def leaf_bytes(value: torch.Tensor | np.ndarray) -> memoryview:
    """The bytes of a tensor or array as a flat buffer; copies only what is not already plain CPU memory."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        if t.device.type != "cpu":
            t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        return t.view(-1).view(torch.uint8).numpy().data
    arr = np.ascontiguousarray(value)
    return arr.reshape(-1).view(np.uint8).data


def _header_bytes(planned: list[PlannedTensor], offsets: list[tuple[int, int]], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    with paused_gc():
        for p, (begin, end) in zip(planned, offsets, strict=True):
            shape = [p.nbytes] if p.raw else list(p.shape)
            header[p.name] = {"dtype": p.code, "shape": shape, "data_offsets": [begin, end]}
        raw = msgspec.json.encode(header)
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER_BYTES:
        raise UnsupportedObjectError(
            f"The safetensors header would be {len(raw)} bytes, over the {MAX_HEADER_BYTES}-byte limit that "
            "readers apply; nothing was saved. Save to a native checkpoint (a path without a suffix), or keep "
            "large values out of the tree and metadata."
        )
    return len(raw).to_bytes(8, "little") + raw


#: Tensors smaller than this are gathered into writes of about this size: one system call each, not one per tensor.
_GATHER_BYTES = 1024 * 1024
#: Below this much data, checksums are taken before writing rather than on a thread beside it.
_THREADED_BYTES = 4 * 1024 * 1024


def _gathered(buffers: list[memoryview]) -> Iterator[memoryview | bytearray]:
    """The buffers in order, small neighbours copied together into one (large ones pass as they are)."""
    pending = bytearray()
    for data in buffers:
        if data.nbytes >= _GATHER_BYTES:
            if pending:
                yield pending
                pending = bytearray()
            yield data
            continue
        pending += data
        if len(pending) >= _GATHER_BYTES:
            yield pending
            pending = bytearray()
    if pending:
        yield pending


def write_shard(
    f: BinaryIO,
    planned: list[PlannedTensor],
    shard: str,
    metadata: dict[str, str] | Callable[[list[TensorEntry]], dict[str, str]] | None = None,
) -> tuple[list[TensorEntry], int]:
    """Write ``planned`` (already in layout order) as one safetensors file.

    Checksums are taken from the very buffers that are then written; only small
    tensors are copied, gathered into writes of about 1 MiB. ``metadata`` may be a function of the finished
    entries, for a header that must carry the checksums.

    Returns:
        The manifest entries of the tensors and the file's size in bytes.
    """
    with paused_gc():  # one short-lived view per tensor, none in a cycle
        buffers = [leaf_bytes(p.leaf.value) for p in planned]
    spans = []
    position = 0
    for p in planned:
        spans.append((position, position + p.nbytes))
        position += p.nbytes

    def entries_with(checksums: list[str]) -> list[TensorEntry]:
        return [
            TensorEntry(
                name=p.name, kind=p.kind, dtype=p.dtype, shape=p.shape, nbytes=p.nbytes, shard=shard,
                offsets=span, checksum=digest, device=p.device,
            )
            for p, span, digest in zip(planned, spans, checksums, strict=True)
        ]  # fmt: skip

    if callable(metadata):
        # The header carries the checksums, so they come first.
        entries = entries_with([checksum(b) for b in buffers])
        header = _header_bytes(planned, spans, metadata(entries))
        f.write(header)
        for data in _gathered(buffers):
            f.write(data)
    elif position < _THREADED_BYTES:  # a thread would cost more than it saves
        entries = entries_with([checksum(b) for b in buffers])
        header = _header_bytes(planned, spans, metadata or {})
        f.write(header)
        for data in _gathered(buffers):
            f.write(data)
    else:
        # Checksums are computed on another thread while the same buffers are written
        # (xxhash and file writes both release the GIL). A plain thread, not an
        # executor: a background save may still be running as the interpreter exits.
        digests: list[str] = []
        hasher = threading.Thread(
            target=lambda: digests.extend(checksum(b) for b in buffers), name="torchkeep-checksum"
        )
        hasher.start()
        try:
            header = _header_bytes(planned, spans, metadata or {})
            f.write(header)
            for data in _gathered(buffers):
                f.write(data)
        finally:
            hasher.join()
        if len(digests) != len(buffers):
            raise RuntimeError("computing checksums failed; see the error printed by the torchkeep-checksum thread")
        entries = entries_with(digests)
    return entries, len(header) + position


@dataclass(frozen=True)
class ShardHeader:
    """A parsed safetensors header: tensors by name, the string metadata, where data starts."""

    tensors: dict[str, HeaderEntry]
    metadata: dict[str, str]
    data_start: int
    size: int


class HeaderEntry(msgspec.Struct, frozen=True, gc=False):
    """One tensor of a safetensors header."""

    dtype: str
    shape: tuple[Annotated[int, msgspec.Meta(ge=0)], ...]
    data_offsets: tuple[Annotated[int, msgspec.Meta(ge=0)], Annotated[int, msgspec.Meta(ge=0)]]


def _parse_header(raw: bytes) -> Any:
    """Parse a header at C speed, falling back to the strict parser when a key may appear twice.

    Every entry has one ``dtype``, ``shape`` and ``data_offsets``: a repeated
    key (a tensor named twice, or a field given twice) makes one of them
    occur more often than there are entries, and then the strict parser finds it.
    """
    parsed = msgspec.json.decode(raw)
    if isinstance(parsed, dict):
        entries = len(parsed) - ("__metadata__" in parsed)
        if all(raw.count(word) == entries for word in (b'"dtype"', b'"shape"', b'"data_offsets"')):
            return parsed
    return strict_json(raw)


def read_header(storage: Storage, key: str) -> ShardHeader:
    """Read and check a safetensors header without touching the tensor data.

    Raises:
        CorruptCheckpointError: the header is truncated, not JSON, or its offsets
            or shapes do not fit the file.
    """
    where = storage.describe(key)
    size = storage.size(key)

    def corrupt(why: str, name: str | None = None) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{where!r} is not a valid safetensors file: {why}. The file is damaged or truncated; "
            "restore it from a good copy.",
            path=where,
            key=name,
        )

    if size < 8:
        raise corrupt(f"it is {size} bytes long, shorter than the 8-byte header length")
    length = int.from_bytes(storage.read(key, 0, 8), "little")
    if length > MAX_HEADER_BYTES:
        raise corrupt(f"it declares a {length}-byte header, over the {MAX_HEADER_BYTES}-byte limit")
    if 8 + length > size:
        raise corrupt(f"it declares a {length}-byte header but holds {size - 8} bytes after the length")
    raw = storage.read(key, 8, length)
    try:
        parsed = _parse_header(raw)
    except (UnicodeDecodeError, ValueError, RecursionError, msgspec.DecodeError) as exc:
        raise corrupt(f"its header is not JSON ({exc})") from exc
    if not isinstance(parsed, dict):
        raise corrupt("its header is not a JSON object")
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt("its __metadata__ is not a map of strings")
    try:
        header = msgspec.convert(parsed, dict[str, HeaderEntry])
    except msgspec.ValidationError:
        for name, info in parsed.items():  # find which one, to name it
            try:
                msgspec.convert(info, HeaderEntry)
            except msgspec.ValidationError as exc:
                raise corrupt(f"tensor {name!r} has a malformed entry ({exc})", name) from None
        raise
    data_start = 8 + length
    for name, info in header.items():
        begin, end = info.data_offsets
        if "\x00" in name:
            raise corrupt(f"tensor name {name!r} holds a NUL byte", name)
        if end < begin or data_start + end > size:
            raise corrupt(f"tensor {name!r} spans bytes {begin}..{end}, beyond the file's data", name)
        itemsize = _CODE_SIZES.get(info.dtype)
        if itemsize is None:
            raise UnsupportedFormatError(
                f"Tensor {name!r} in {where!r} has dtype {info.dtype!r}, which this torchkeep cannot read.",
                path=where,
                key=name,
            )
        if math.prod(info.shape) * itemsize != end - begin:
            raise corrupt(f"tensor {name!r} has shape {list(info.shape)} but {end - begin} bytes", name)
    return ShardHeader(tensors=header, metadata=metadata, data_start=data_start, size=size)


_DTYPES: dict[tuple[str, str], torch.dtype | np.dtype[Any]] = {}  # (kind, name) -> dtype, as looked up once


def entry_dtype(entry: TensorEntry, *, path: str) -> torch.dtype | np.dtype[Any]:
    """The dtype of a manifest entry, refusing one this torch lacks or a byte count that is not its shape's."""
    dtype = _DTYPES.get((entry.kind, entry.dtype))
    if dtype is None:
        if entry.kind == "torch":
            dtype = torch_dtype_from_name(entry.dtype, path=path, key=entry.name)
        else:
            dtype = numpy_dtype_from_name(entry.dtype, path=path, key=entry.name)
        _DTYPES[(entry.kind, entry.dtype)] = dtype
    if math.prod(entry.shape) * dtype.itemsize != entry.nbytes:
        raise CorruptCheckpointError(
            f"Tensor {entry.name!r} in {path!r} claims shape {list(entry.shape)} of {entry.dtype} "
            f"but {entry.nbytes} bytes; the manifest is damaged.",
            path=path,
            key=entry.name,
        )
    return dtype


def materialize(buf: memoryview, start: int, entry: TensorEntry, *, path: str) -> torch.Tensor | np.ndarray:
    """A tensor or array viewing ``entry``'s bytes in ``buf`` in place (no copy), with a storage of its own."""
    dtype = entry_dtype(entry, path=path)
    itemsize = dtype.itemsize
    if isinstance(dtype, torch.dtype):
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=dtype)
        if start % itemsize == 0:
            return torch.frombuffer(buf, dtype=dtype, count=entry.nbytes // itemsize, offset=start).view(entry.shape)
        # Misaligned (a foreign file): one copy so the dtype view is legal.
        flat = torch.frombuffer(buf, dtype=torch.uint8, count=entry.nbytes, offset=start).clone()
        return flat.view(dtype).view(entry.shape)
    arr = np.frombuffer(buf, dtype=np.uint8, count=entry.nbytes, offset=start)
    return arr.view(dtype).reshape(entry.shape)
