"""The manifest: what a native checkpoint holds, as versioned, human-readable JSON.

``manifest.json`` is written last; its presence is what makes a directory a
checkpoint. Layout (format version 1)::

    {
      "format": "torchkeep.checkpoint",
      "format_version": 1,
      "created": "2026-11-28T15:00:00.123456Z",
      "provenance": {"torchkeep": "...", "torch": "...", "python": "...", "numpy": "..."},
      "checksum_algorithm": "xxh3-64",
      "metadata": {... the user's JSON ...},
      "tree": <node, see torchkeep.tree>,
      "shards": [{"file": "data-00000.safetensors", "size": 1234}],
      "tensors": [{"name": "model.weight", "kind": "torch", "dtype": "float32",
                   "shape": [4, 4], "device": "cpu", "shard": "data-00000.safetensors",
                   "offsets": [0, 64], "checksum": "9f...", "nbytes": 64}]
    }

``offsets`` are relative to the start of the shard's data, as in safetensors.
An unknown format version is refused, never guessed at.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from torchkeep._version import __version__
from torchkeep.errors import (
    ChecksumMismatchError,
    CorruptCheckpointError,
    UnsupportedFormatError,
    UnsupportedObjectError,
)
from torchkeep.integrity import CHECKSUM_ALGORITHM, checksum

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_NAME", "Manifest", "ShardEntry", "TensorEntry", "utc_now"]

FORMAT_NAME = "torchkeep.checkpoint"
#: The newest format this torchkeep reads and writes. Version 2 adds compressed
#: shards; a checkpoint without them is still written as version 1.
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
#: The manifest's own checksum: the tree and every plain value are covered, not only tensor bytes.
MANIFEST_CHECKSUM = "manifest_checksum"
#: The largest manifest (or embedded manifest, or sharded-safetensors index) read or written.
#: Parsing JSON costs up to ~17x its size in Python objects (see strict_json), so this bounds a
#: reader's memory near 1.1 GiB; a manifest of 100,000 tensors is about 32 MiB.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
#: The most objects and arrays any JSON torchkeep reads may hold (5 per tensor in a manifest).
MAX_JSON_CONTAINERS = 2_000_000


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor or array lives and how to check it.

    ``kind`` is ``"torch"`` (dtype is a torch dtype name) or ``"numpy"`` (dtype is
    a numpy ``dtype.str``).
    """

    name: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    shard: str
    offsets: tuple[int, int]
    checksum: str
    device: str = "cpu"
    shuffle: int = 0  # in a compressed shard: the element size its bytes were shuffled by (0: not shuffled)

    def to_json(self) -> dict[str, Any]:
        # Written out by hand, in field order: dataclasses.asdict deep-copies every value, and a
        # checkpoint may hold hundreds of thousands of entries.
        out: dict[str, Any] = {
            "name": self.name, "kind": self.kind, "dtype": self.dtype, "shape": list(self.shape),
            "nbytes": self.nbytes, "shard": self.shard, "offsets": list(self.offsets), "checksum": self.checksum,
            "device": self.device,
        }  # fmt: skip
        if self.shuffle:
            out["shuffle"] = self.shuffle
        return out


@dataclass(frozen=True)
class ShardEntry:
    """One data file of the checkpoint.

    ``compression`` is None for a safetensors shard, or ``"zstd"`` for a shard of
    independent zstd frames, one per tensor (format version 2). ``shared`` marks
    a one-tensor shard in the manager directory's content-addressed ``objects``
    folder, beside the checkpoint rather than inside it (format version 2).
    """

    file: str
    size: int
    compression: str | None = None
    shared: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "size": self.size}
        if self.compression is not None:
            out["compression"] = self.compression
        if self.shared:
            out["shared"] = True
        return out


def utc_now() -> str:
    """The current time as ISO 8601 in UTC with microseconds, as every torchkeep file records it."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def provenance() -> dict[str, str]:
    """The versions that wrote a checkpoint, recorded for whoever reads it later."""
    return {
        "torchkeep": __version__,
        "torch": torch.__version__,
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
            out[key] = _plain(item, f"{where}[{key!r}]")
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


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` of a native checkpoint."""

    tree: Any
    tensors: tuple[TensorEntry, ...]
    shards: tuple[ShardEntry, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=utc_now)
    provenance: dict[str, str] = field(default_factory=provenance)
    checksum_algorithm: str = CHECKSUM_ALGORITHM
    format_version: int = 1  # 2 only when a shard is compressed, so older readers keep reading the rest

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "created": self.created,
            "provenance": self.provenance,
            "checksum_algorithm": self.checksum_algorithm,
            "metadata": self.metadata,
            "tree": self.tree,
            "shards": [s.to_json() for s in self.shards],
            "tensors": [t.to_json() for t in self.tensors],
        }

    def to_bytes(self) -> bytes:
        """The manifest as written; refuses one that readers would refuse as too large."""
        data = self.to_json()
        data[MANIFEST_CHECKSUM] = _canonical_checksum(data)
        raw = json.dumps(data, indent=1, ensure_ascii=True, allow_nan=False).encode("ascii")
        if len(raw) > MAX_MANIFEST_BYTES:
            raise UnsupportedObjectError(
                f"The manifest would be {len(raw)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit that "
                "every reader applies; nothing was saved. Store large bytes or string values as tensors "
                "(torch.frombuffer), and metadata as a few small values.",
            )
        return raw

    @classmethod
    def from_json(cls, data: object, *, path: str | None = None) -> Manifest:
        """Validate and parse a manifest's JSON.

        Raises:
            UnsupportedFormatError: not a torchkeep manifest, or a newer format version.
            CorruptCheckpointError: a field is missing or has the wrong type.
        """
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise UnsupportedFormatError(f"{path!r} is not a torchkeep manifest.", path=path)
        if MANIFEST_CHECKSUM in data:  # manifests written before it was added carry none
            data = dict(data)
            recorded = data.pop(MANIFEST_CHECKSUM)
            if recorded != _canonical_checksum(data):
                raise ChecksumMismatchError(
                    f"The manifest of {path!r} is damaged: its contents fail their checksum. Restore the "
                    "checkpoint from a good copy, or load an earlier one.",
                    path=path,
                    damaged=[MANIFEST_NAME],
                )
        version = data.get("format_version")
        if type(version) is not int or version < 1:
            raise CorruptCheckpointError(f"{path!r} has an invalid format_version {version!r}.", path=path)
        if version > FORMAT_VERSION:
            raise UnsupportedFormatError(
                f"{path!r} was written in checkpoint format {version}; this torchkeep "
                f"({__version__}) reads formats up to {FORMAT_VERSION}. Upgrade torchkeep to load it.",
                path=path,
            )
        try:
            algorithm = data["checksum_algorithm"]
            if algorithm != CHECKSUM_ALGORITHM:
                raise UnsupportedFormatError(
                    f"{path!r} uses checksum algorithm {algorithm!r}; this torchkeep knows {CHECKSUM_ALGORITHM!r}.",
                    path=path,
                )
            for field_name in ("shards", "tensors"):
                if type(data[field_name]) is not list:
                    raise TypeError(f"{field_name} is a {type(data[field_name]).__name__}, not a list")
            shards = tuple(_shard_entry(s, path) for s in data["shards"])
            tensors = tuple(_tensor_entry(t) for t in data["tensors"])
            for what, names in (("tensor", [t.name for t in tensors]), ("shard", [s.file for s in shards])):
                if len(set(names)) != len(names):
                    raise ValueError(f"a {what} name appears twice")
            metadata = data["metadata"]
            if not isinstance(metadata, dict):
                raise TypeError("metadata is not an object")
            if not isinstance(data["provenance"], dict):
                raise TypeError("provenance is not an object")
            return cls(
                tree=data["tree"],
                tensors=tensors,
                shards=shards,
                metadata=metadata,
                created=_str(data["created"]),
                provenance=dict(data["provenance"]),
                checksum_algorithm=algorithm,
                format_version=version,
            )
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as exc:
            if isinstance(exc, UnsupportedFormatError):
                raise
            raise CorruptCheckpointError(
                f"The manifest of {path!r} is damaged: {type(exc).__name__}: {exc}.", path=path
            ) from exc

    @classmethod
    def from_bytes(cls, raw: bytes, *, path: str | None = None) -> Manifest:
        try:
            data = strict_json(raw)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise CorruptCheckpointError(
                f"The manifest of {path!r} is not valid JSON ({exc}); the checkpoint is damaged.", path=path
            ) from exc
        return cls.from_json(data, path=path)


def _canonical_checksum(data: dict[str, Any]) -> str:
    """The checksum of a manifest's contents, over a canonical JSON form that parsing and dumping reproduce."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return checksum(canonical.encode("ascii"))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def strict_json(raw: bytes) -> Any:
    """Parse UTF-8 JSON, refusing duplicate keys (a reader must never pick one of two silently).

    Objects and arrays cost far more memory parsed than written (``{}`` is two
    bytes of JSON and a few hundred in Python), so their number is bounded
    before parsing: a reader's memory stays within about 17 times the bytes
    (short strings are the costliest left), about 1.1 GiB at the manifest cap.

    Raises:
        UnicodeDecodeError, ValueError, RecursionError: the bytes are not such JSON, or hold too many containers.
    """
    containers = raw.count(b"{") + raw.count(b"[")  # an upper bound: braces inside strings count too
    if containers > MAX_JSON_CONTAINERS:
        raise ValueError(
            f"it holds {containers} objects and arrays, over the {MAX_JSON_CONTAINERS} a reader parses "
            "(a checkpoint of 100,000 tensors holds about 500,000)"
        )
    return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, found {value!r}")
    return value


def _int(value: object) -> int:
    if type(value) is not int or value < 0:
        raise TypeError(f"expected a non-negative integer, found {value!r}")
    return value


def _shard_entry(s: dict[str, Any], path: str | None) -> ShardEntry:
    if type(s) is not dict:
        raise TypeError(f"a shard entry is a {type(s).__name__}, not an object")
    compression = s.get("compression")
    if compression not in (None, "zstd"):
        raise UnsupportedFormatError(
            f"{path!r} has a shard compressed with {compression!r}, which this torchkeep cannot read.", path=path
        )
    shared = s.get("shared", False)
    if shared is not True and shared is not False:
        raise TypeError(f"shard {s.get('file')!r} has a non-boolean 'shared'")
    return ShardEntry(file=_str(s["file"]), size=_int(s["size"]), compression=compression, shared=shared)


def _tensor_entry(t: dict[str, Any]) -> TensorEntry:
    if type(t) is not dict:
        raise TypeError(f"a tensor entry is a {type(t).__name__}, not an object")
    if "\x00" in _str(t["name"]):
        raise ValueError(f"tensor name {t['name']!r} holds a NUL byte")
    begin, end = (_int(v) for v in t["offsets"])
    if end < begin:
        raise ValueError(f"tensor {t.get('name')!r} has offsets that run backwards")
    kind = _str(t["kind"])
    if kind not in ("torch", "numpy"):
        raise ValueError(f"tensor {t.get('name')!r} has unknown kind {kind!r}")
    return TensorEntry(
        name=_str(t["name"]),
        kind=kind,
        dtype=_str(t["dtype"]),
        shape=tuple(_int(d) for d in t["shape"]),
        nbytes=_int(t["nbytes"]),
        shard=_str(t["shard"]),
        offsets=(begin, end),
        checksum=_str(t["checksum"]),
        device=_str(t.get("device", "cpu")),
        shuffle=_int(t.get("shuffle", 0)),
    )
