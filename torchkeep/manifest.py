"""The manifest: what a native checkpoint holds, as versioned JSON.

``manifest.json`` is written last; its presence is what makes a directory a
checkpoint. Layout (format version 1), written as compact JSON with sorted
keys and the manifest's own digest as the last member::

    {"checksum_algorithm": "xxh3-64",
     "created": "2026-11-28T15:00:00.123456Z",
     "format": "torchkeep.checkpoint", "format_version": 1,
     "metadata": {... the user's JSON ...},
     "provenance": {"numpy": "...", "python": "...", "torch": "...", "torchkeep": "..."},
     "shards": [{"file": "data-00000.safetensors", "size": 1234}],
     "tensors": [{"checksum": "9f...", "dtype": "float32", "kind": "torch", "name": "model.weight",
                  "nbytes": 64, "offsets": [0, 64], "shape": [4, 4], "shard": "data-00000.safetensors"}],
     "tree": <node, see torchkeep.tree>,
     "manifest_digest": "<xxh3-64 of everything before it, closed with '}'>"}

``offsets`` are relative to the start of the shard's data, as in safetensors.
The digest covers the bytes as written, and a reader accepts them only in the
one form this writer produces (so no key can appear twice and no value can
be read two ways). Manifests written before the digest carry
``manifest_checksum`` over a canonical re-encoding instead; both are read.
An unknown format version is refused, never guessed at.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import re
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
import torch

from torchkeep._version import __version__
from torchkeep.errors import (
    ChecksumMismatchError,
    CorruptCheckpointError,
    UnsupportedFormatError,
    UnsupportedObjectError,
)
from torchkeep.integrity import CHECKSUM_ALGORITHM, checksum, new_checksum

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "Chunk",
    "ChunkedTensor",
    "Manifest",
    "ShardEntry",
    "ShardedManifest",
    "TensorEntry",
    "utc_now",
]

FORMAT_NAME = "torchkeep.checkpoint"
#: The newest format this torchkeep reads and writes. Version 2 adds compressed
#: shards; a checkpoint without them is still written as version 1.
FORMAT_VERSION = 3
MANIFEST_NAME = "manifest.json"
#: The manifest's digest over its own bytes: the tree and every plain value are covered, not only tensor bytes.
MANIFEST_DIGEST = "manifest_digest"
#: The older form: a checksum over the manifest re-encoded canonically by the json module.
MANIFEST_CHECKSUM = "manifest_checksum"
_DIGEST_TAIL = re.compile(rb',"manifest_digest":"([0-9a-f]{16})"\}\Z')
#: The largest manifest (or embedded manifest, or sharded-safetensors index) read or written.
#: Parsing JSON costs up to ~17x its size in Python objects (see strict_json), so this bounds a
#: reader's memory near 1.1 GiB; a manifest of 100,000 tensors is about 25 MiB.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
#: The most objects and arrays any JSON torchkeep reads may hold (5 per tensor in a manifest).
MAX_JSON_CONTAINERS = 2_000_000

_Count = Annotated[int, msgspec.Meta(ge=0)]


class TensorEntry(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """Where one tensor or array lives and how to check it.

    Entries hold only strings and numbers, so the cycle collector need not
    track them (``gc=False``): a checkpoint may have hundreds of thousands.

    ``kind`` is ``"torch"`` (dtype is a torch dtype name) or ``"numpy"`` (dtype is
    a numpy ``dtype.str``).
    """

    name: str
    kind: Literal["torch", "numpy"]
    dtype: str
    shape: tuple[_Count, ...]
    nbytes: _Count
    shard: str
    offsets: tuple[_Count, _Count]
    checksum: str
    device: str = "cpu"
    shuffle: _Count = 0  # in a compressed shard: the element size its bytes were shuffled by (0: not shuffled)


class ShardEntry(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """One data file of the checkpoint.

    ``compression`` is None for a safetensors shard, or ``"zstd"`` for a shard of
    independent zstd frames, one per tensor (format version 2). ``shared`` marks
    a one-tensor shard in the manager directory's content-addressed ``objects``
    folder, beside the checkpoint rather than inside it (format version 2).
    """

    file: str
    size: _Count
    compression: str | None = None
    shared: bool = False


def utc_now() -> str:
    """The current time as ISO 8601 in UTC with microseconds, as every torchkeep file records it."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def provenance() -> dict[str, str]:
    """The versions that wrote a checkpoint, recorded for whoever reads it later."""
    return {
        "torchkeep": __version__,
        "torch": str(torch.__version__),  # a str subclass, which JSON encoders refuse
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _plain(value: Any, where: str) -> Any:
    """The JSON form of a metadata value: the values people keep in configs become plain JSON."""
    if value is None or type(value) in (bool, int, str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UnsupportedObjectError(f"{where} is {value}, and metadata is JSON: use a finite number or a string.")
        return float(value)
    if isinstance(value, (np.generic, torch.Tensor)) and getattr(value, "ndim", 0) == 0:
        return _plain(value.item(), where)  # a numpy or tensor scalar, such as a loss
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):  # subclasses such as IntEnum
        return int(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name), f"{where}.{f.name}") for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise UnsupportedObjectError(f"{where} has the key {key!r}; metadata keys are strings.")
            out[str(key)] = _plain(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise UnsupportedObjectError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which metadata cannot hold: metadata "
        "is JSON (str keys; str, int, float, bool, None, lists, dicts; numpy and tensor scalars, paths and "
        "dataclasses are converted). Convert it, or save it in the state tree instead."
    )


def check_metadata(metadata: object) -> dict[str, Any]:
    """Turn user metadata into plain JSON, or refuse it with the place of the first value that cannot be.

    Numpy and tensor scalars become numbers, paths strings, dataclasses dicts
    of their fields, tuples lists: what comes back on load is the plain form.
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise UnsupportedObjectError(
            f"metadata must be a dict of JSON values, not {type(metadata).__name__}.", key="metadata"
        )
    try:
        plain = _plain(metadata, "metadata")
    except UnsupportedObjectError as err:
        raise UnsupportedObjectError(str(err), key="metadata") from None
    except RecursionError:
        raise UnsupportedObjectError("metadata is nested too deeply (or contains itself).", key="metadata") from None
    return plain


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    """The parsed ``manifest.json`` of a native checkpoint."""

    tree: Any
    tensors: tuple[TensorEntry, ...]
    shards: tuple[ShardEntry, ...]
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    created: str = msgspec.field(default_factory=utc_now)
    provenance: dict[str, str] = msgspec.field(default_factory=provenance)
    checksum_algorithm: str = CHECKSUM_ALGORITHM
    format_version: int = 1  # 2 only when a shard is compressed, so older readers keep reading the rest
    format: str = FORMAT_NAME

    def to_json(self) -> dict[str, Any]:
        """The manifest as plain JSON values."""
        out: dict[str, Any] = msgspec.to_builtins(self)
        return out

    def to_bytes(self) -> bytes | bytearray:
        """The manifest as written; refuses one that readers would refuse as too large."""
        raw: bytes | bytearray
        buffer = bytearray()
        try:
            _ENCODER.encode_into(self, buffer)  # into one buffer, sealed in place: no copy of a large manifest
        except UnicodeEncodeError:
            # A lone surrogate in a str of the tree: only JSON's escapes can hold it, which the
            # older, slower form uses (every reader reads both).
            data = self.to_json()
            data[MANIFEST_CHECKSUM] = _canonical_checksum(data)
            raw = json.dumps(data, ensure_ascii=True, allow_nan=False).encode("ascii")
        else:
            raw = seal(buffer)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise UnsupportedObjectError(
                f"The manifest would be {len(raw)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit that "
                "every reader applies; nothing was saved. Store large bytes or string values as tensors "
                "(torch.frombuffer), and metadata as a few small values.",
            )
        return raw

    @classmethod
    def from_bytes(cls, raw: bytes, *, path: str | None = None) -> Manifest:
        """Check and parse a manifest as read from disk.

        Raises:
            UnsupportedFormatError: not a torchkeep manifest, or a newer format version.
            ChecksumMismatchError: the bytes fail the manifest's own digest or checksum.
            CorruptCheckpointError: not JSON, or a field is missing or has the wrong type.
        """
        bound_containers(raw, f"The manifest of {path!r}", path)
        sealed = sealed_body(raw)
        if sealed is None:
            return _from_older(raw, path)
        end, intact = sealed
        if not intact:
            raise _damaged(path)
        body = memoryview(raw)[:end]
        try:
            manifest = _DECODER.decode(raw)  # the digest member is no field of the struct, so it is passed over
        except msgspec.ValidationError as exc:
            _check_header(msgspec.json.decode(raw), path)  # a newer format fails here, more helpfully
            raise CorruptCheckpointError(f"The manifest of {path!r} is damaged: {exc}.", path=path) from exc
        except (msgspec.DecodeError, RecursionError) as exc:
            raise CorruptCheckpointError(f"The manifest of {path!r} is not valid JSON ({exc}).", path=path) from exc
        if not same_form(raw, end, manifest):
            # A sharded checkpoint's manifest has one field more, which the plain decoding passed over.
            with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
                sharded = _SHARDED_DECODER.decode(raw)
                if same_form(raw, end, sharded):
                    _check_entries(sharded, path)
                    return sharded
            # Decoding keeps the last of two equal keys, so the bytes re-encode differently.
            try:
                strict_json(bytes(body) + b"}")
                why = "it is not in the form torchkeep writes (an unknown field, or spacing)"
            except ValueError as exc:
                why = str(exc)
            raise CorruptCheckpointError(f"The manifest of {path!r} is damaged: {why}.", path=path)
        _check_entries(manifest, path)
        return manifest

    @classmethod
    def from_json(cls, data: object, *, path: str | None = None) -> Manifest:
        """Validate and parse a manifest's JSON values (the form written before the digest).

        Raises:
            UnsupportedFormatError: not a torchkeep manifest, or a newer format version.
            ChecksumMismatchError: the values fail the manifest's own checksum.
            CorruptCheckpointError: a field is missing or has the wrong type.
        """
        _check_header(data, path)
        assert isinstance(data, dict)
        if MANIFEST_DIGEST in data:
            raise CorruptCheckpointError(
                f"The manifest of {path!r} is damaged: it has a digest but not the form it was written in.",
                path=path,
            )
        if MANIFEST_CHECKSUM in data:  # manifests written before it was added carry none
            data = dict(data)
            if data.pop(MANIFEST_CHECKSUM) != _canonical_checksum(data):
                raise _damaged(path)
        try:
            manifest = msgspec.convert(data, type=ShardedManifest if "chunked" in data else cls)
        except msgspec.ValidationError as exc:
            raise CorruptCheckpointError(f"The manifest of {path!r} is damaged: {exc}.", path=path) from exc
        _check_entries(manifest, path)
        return manifest


_ENCODER = msgspec.json.Encoder(order="sorted")


def seal(body: bytes | bytearray) -> bytearray:
    """A JSON object's bytes closed by their digest, as a manifest is written (a bytearray is sealed in place)."""
    sealed = body if isinstance(body, bytearray) else bytearray(body)
    digest = checksum(sealed)
    del sealed[-1]
    sealed += b',"%s":"%s"}' % (MANIFEST_DIGEST.encode(), digest.encode())
    return sealed


def encode_sorted(data: Any) -> bytes:
    """JSON values in the form a manifest's body is written: compact, keys sorted, UTF-8."""
    return _ENCODER.encode(data)


def sealed_body(raw: bytes) -> tuple[int, bool] | None:
    """Where a sealed JSON file's body ends (its digest member starts) and whether the digest holds.

    None when the bytes end in no digest member. The body is read in place, not copied.
    """
    tail = _DIGEST_TAIL.search(raw, max(0, len(raw) - 64))
    if tail is None:
        return None
    end = tail.start()
    digest = new_checksum()
    digest.update(memoryview(raw)[:end])
    digest.update(b"}")  # the body closed again, as it was before the digest was added
    return end, digest.hexdigest() == tail.group(1).decode("ascii")


def same_form(raw: bytes, end: int, decoded: Any) -> bool:
    """Whether ``decoded``, encoded again, is the very body it was read from: one spelling only."""
    again = _ENCODER.encode(decoded)
    return len(again) == end + 1 and memoryview(again)[:end] == memoryview(raw)[:end]


def bound_containers(raw: bytes, what: str, path: str | None) -> None:
    """Refuse JSON with more objects and arrays than a reader parses (the memory bound), as damage."""
    try:
        _count_containers(raw)
    except ValueError as exc:
        raise CorruptCheckpointError(f"{what} is damaged: {exc}.", path=path) from exc


class Chunk(msgspec.Struct, frozen=True, gc=False):
    """One rank's piece of a sharded tensor: the tensor entry holding it and where it starts in the whole."""

    entry: str
    offsets: tuple[_Count, ...]


class ChunkedTensor(msgspec.Struct, frozen=True, gc=False):
    """A tensor saved in pieces by several ranks; its chunks together cover it once."""

    dtype: str
    shape: tuple[_Count, ...]
    chunks: tuple[Chunk, ...]


class ShardedManifest(Manifest, frozen=True, kw_only=True):
    """The manifest of a checkpoint written by several ranks (format version 3).

    ``tensors`` holds every rank's chunks, each a tensor of its own with its
    checksum; the tree names the whole tensors of ``chunked``, which a reader
    puts together from their chunks (or, through torch.distributed.checkpoint,
    reads as the pieces each rank of another layout needs).
    """

    chunked: dict[str, ChunkedTensor]


_DECODER = msgspec.json.Decoder(type=Manifest)
_SHARDED_DECODER = msgspec.json.Decoder(type=ShardedManifest)


def _damaged(path: str | None) -> ChecksumMismatchError:
    return ChecksumMismatchError(
        f"The manifest of {path!r} is damaged: its contents fail their checksum. Restore the "
        "checkpoint from a good copy, or load an earlier one.",
        path=path,
        damaged=[MANIFEST_NAME],
    )


def _from_older(raw: bytes, path: str | None) -> Manifest:
    try:
        data = strict_json(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(
            f"The manifest of {path!r} is not valid JSON ({exc}); the checkpoint is damaged.", path=path
        ) from exc
    return Manifest.from_json(data, path=path)


def _check_header(data: object, path: str | None) -> None:
    """Refuse what is not a torchkeep manifest, or one from a format this torchkeep does not read."""
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise UnsupportedFormatError(f"{path!r} is not a torchkeep manifest.", path=path)
    version = data.get("format_version")
    if type(version) is not int or version < 1:
        raise CorruptCheckpointError(f"{path!r} has an invalid format_version {version!r}.", path=path)
    if version > FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{path!r} was written in checkpoint format {version}; this torchkeep "
            f"({__version__}) reads formats up to {FORMAT_VERSION}. Upgrade torchkeep to load it.",
            path=path,
        )
    algorithm = data.get("checksum_algorithm")
    if algorithm != CHECKSUM_ALGORITHM:
        raise UnsupportedFormatError(
            f"{path!r} uses checksum algorithm {algorithm!r}; this torchkeep knows {CHECKSUM_ALGORITHM!r}.",
            path=path,
        )


def _check_entries(manifest: Manifest, path: str | None) -> None:
    """What the schema cannot say: a known format, unique names, offsets that run forwards."""
    _check_header(
        {"format": manifest.format, "format_version": manifest.format_version,
         "checksum_algorithm": manifest.checksum_algorithm},
        path,
    )  # fmt: skip
    why = None
    names = [t.name for t in manifest.tensors]
    files = [s.file for s in manifest.shards]
    if len(set(names)) != len(names):
        why = "a tensor name appears twice"
    elif len(set(files)) != len(files):
        why = "a shard name appears twice"
    elif any("\x00" in name for name in names):
        why = "a tensor name holds a NUL byte"
    elif any(t.offsets[1] < t.offsets[0] for t in manifest.tensors):
        why = "a tensor's offsets run backwards"
    if why is not None:
        raise CorruptCheckpointError(f"The manifest of {path!r} is damaged: {why}.", path=path)
    if isinstance(manifest, ShardedManifest):
        _check_chunks(manifest, path)
    for shard in manifest.shards:
        if shard.compression not in (None, "zstd"):
            raise UnsupportedFormatError(
                f"{path!r} has a shard compressed with {shard.compression!r}, which this torchkeep cannot read.",
                path=path,
            )


def _check_chunks(manifest: ShardedManifest, path: str | None) -> None:
    """Every chunk names a stored tensor of its dtype, inside its whole tensor; together they cover it once."""
    if manifest.format_version < 3:
        raise CorruptCheckpointError(
            f"The manifest of {path!r} is damaged: it has sharded tensors but format_version "
            f"{manifest.format_version} (they came with version 3).",
            path=path,
        )
    entries = {t.name: t for t in manifest.tensors}
    for name, whole in manifest.chunked.items():
        covered = 0
        for chunk in whole.chunks:
            entry = entries.get(chunk.entry)
            if (
                entry is None
                or entry.dtype != whole.dtype
                or len(chunk.offsets) != len(whole.shape)
                or len(entry.shape) != len(whole.shape)
                or any(o + n > size for o, n, size in zip(chunk.offsets, entry.shape, whole.shape, strict=True))
            ):
                raise CorruptCheckpointError(
                    f"The manifest of {path!r} is damaged: a chunk of {name!r} ({chunk.entry!r}) does not fit it.",
                    path=path,
                    key=name,
                )
            covered += math.prod(entry.shape)
        boxes = [(c.offsets, entries[c.entry].shape) for c in whole.chunks]
        overlap = _first_overlap(boxes)
        if overlap is not None:
            raise CorruptCheckpointError(
                f"The manifest of {path!r} is damaged: chunks {whole.chunks[overlap[0]].entry!r} and "
                f"{whole.chunks[overlap[1]].entry!r} of {name!r} overlap.",
                path=path,
                key=name,
            )
        if covered != math.prod(whole.shape):
            raise CorruptCheckpointError(
                f"The manifest of {path!r} is damaged: the chunks of {name!r} hold {covered} elements, "
                f"not the {math.prod(whole.shape)} of its shape {list(whole.shape)}.",
                path=path,
                key=name,
            )


def _first_overlap(boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> tuple[int, int] | None:
    """The first two boxes (offsets, sizes) that share an element; pieces of one tensor are few."""
    order = sorted(range(len(boxes)), key=lambda i: boxes[i][0])
    for a_at, a in enumerate(order):
        a_start, a_size = boxes[a]
        if 0 in a_size:
            continue
        for b in order[a_at + 1 :]:
            b_start, b_size = boxes[b]
            if 0 in b_size:
                continue
            if all(
                s1 < s2 + n2 and s2 < s1 + n1 for s1, n1, s2, n2 in zip(a_start, a_size, b_start, b_size, strict=True)
            ):
                return a, b
    return None


def _canonical_checksum(data: dict[str, Any]) -> str:
    """The older manifest checksum, over a canonical JSON form that parsing and dumping reproduce."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return checksum(canonical.encode("ascii"))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _count_containers(raw: bytes) -> None:
    containers = raw.count(b"{") + raw.count(b"[")  # an upper bound: braces inside strings count too
    if containers > MAX_JSON_CONTAINERS:
        raise ValueError(
            f"it holds {containers} objects and arrays, over the {MAX_JSON_CONTAINERS} a reader parses "
            "(a checkpoint of 100,000 tensors holds about 500,000)"
        )


def strict_json(raw: bytes) -> Any:
    """Parse UTF-8 JSON, refusing duplicate keys (a reader must never pick one of two silently).

    Objects and arrays cost far more memory parsed than written (``{}`` is two
    bytes of JSON and a few hundred in Python), so their number is bounded
    before parsing: a reader's memory stays within about 17 times the bytes
    (short strings are the costliest left), about 1.1 GiB at the manifest cap.

    Raises:
        UnicodeDecodeError, ValueError, RecursionError: the bytes are not such JSON, or hold too many containers.
    """
    _count_containers(raw)
    return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
