"""Single ``.safetensors`` files and Hugging Face-style sharded ones (``*.safetensors.index.json``).

torchkeep writes a single file with its manifest in the header's
``__metadata__["torchkeep"]``, so the tree and the checksums travel with the
tensors. Files written by other tools load as a flat ``{name: tensor}`` dict.
"""

from __future__ import annotations

import collections
from typing import Any

from torchkeep.dtypes import torch_dtype_from_code, torch_dtype_name
from torchkeep.errors import CorruptCheckpointError
from torchkeep.formats.detect import Format
from torchkeep.formats.shard import PlannedTensor, ShardHeader, read_header, tree_order, write_shard
from torchkeep.formats.source import ManifestSource
from torchkeep.manifest import MAX_MANIFEST_BYTES, Manifest, TensorEntry, strict_json
from torchkeep.storage import Storage, join_key, parent_key

__all__ = ["open_safetensors", "open_sharded_safetensors", "write_safetensors"]

_META_KEY = "torchkeep"


def write_safetensors(
    storage: Storage, key: str, tree: Any, planned: list[PlannedTensor], metadata: dict[str, Any]
) -> Manifest:
    """Write one ``.safetensors`` file atomically, the manifest inside its header."""
    written: list[Manifest] = []

    def header_metadata(entries: list[TensorEntry]) -> dict[str, str]:
        # The header must carry the checksums, so it is built once they are known.
        manifest = Manifest(tree=tree, tensors=tree_order(entries, planned), shards=(), metadata=metadata)
        written.append(manifest)
        return {"format": "pt", _META_KEY: manifest.to_bytes().decode("utf-8")}

    with storage.begin(key, directory=False) as txn, txn.open() as f:
        write_shard(f, planned, "", header_metadata)
    return written[0]


def _foreign_entries(header: ShardHeader, shard: str) -> list[TensorEntry]:
    entries = []
    for name, info in sorted(header.tensors.items(), key=lambda kv: kv[1].data_offsets[0]):
        dtype = torch_dtype_from_code(info.dtype)
        assert dtype is not None  # read_header refuses unknown codes
        begin, end = info.data_offsets
        entries.append(
            TensorEntry(
                name=name, kind="torch", dtype=torch_dtype_name(dtype), shape=info.shape,
                nbytes=end - begin, shard=shard, offsets=(begin, end), checksum="",
            )
        )  # fmt: skip
    return entries


def _flat_tree(names: list[str]) -> dict[str, Any]:
    return {"t": "odict", "items": [[name, {"t": "tensor", "name": name}] for name in names]}


def open_safetensors(storage: Storage, key: str) -> ManifestSource:
    """Open a single safetensors file, torchkeep's or anyone's."""
    path = storage.describe(key)
    header = read_header(storage, key)
    embedded = header.metadata.get(_META_KEY)
    if embedded is not None:
        if len(embedded) > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(f"The manifest inside {path!r} is too large.", path=path)
        manifest = Manifest.from_bytes(embedded.encode("utf-8"), path=path)
        return ManifestSource(Format.SAFETENSORS, path, storage, manifest, {"": key})
    entries = _foreign_entries(header, "")
    manifest = Manifest(
        tree=_flat_tree([e.name for e in entries]),
        tensors=tuple(entries),
        shards=(),
        metadata=dict(header.metadata),
        created="",
        provenance={},
    )
    return ManifestSource(Format.SAFETENSORS, path, storage, manifest, {"": key})


def open_sharded_safetensors(storage: Storage, key: str) -> ManifestSource:
    """Open a sharded safetensors model by its index file or the directory holding it."""
    if storage.is_dir(key):
        indexes = [n for n in storage.list(key) if n.endswith(".safetensors.index.json")]
        index_key = join_key(key, indexes[0])
        base = key
    else:
        index_key = key
        base = parent_key(key)
    path = storage.describe(index_key)
    if storage.size(index_key) > MAX_MANIFEST_BYTES:
        raise CorruptCheckpointError(f"The index {path!r} is too large.", path=path)
    try:
        index = strict_json(storage.read(index_key))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not a map of file names")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CorruptCheckpointError(f"The index {path!r} is damaged: {exc}.", path=path) from exc
    by_file: dict[str, list[str]] = collections.defaultdict(list)
    for name, file in weight_map.items():
        if "/" in file or "\\" in file or file in ("", ".", "..") or "\x00" in file:
            raise CorruptCheckpointError(
                f"The index {path!r} maps {name!r} to {file!r}, which is not a file beside the index.", path=path
            )
        by_file[file].append(name)
    entries: list[TensorEntry] = []
    shard_keys = {}
    for file, names in by_file.items():
        shard_key = join_key(base, file)
        header = read_header(storage, shard_key)
        missing = [n for n in names if n not in header.tensors]
        if missing:
            raise CorruptCheckpointError(
                f"The index {path!r} places {missing[0]!r} in {file!r}, which does not hold it.",
                path=path,
                key=missing[0],
            )
        wanted = set(names)
        entries.extend(e for e in _foreign_entries(header, file) if e.name in wanted)
        shard_keys[file] = shard_key
    metadata = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    manifest = Manifest(
        tree=_flat_tree(list(weight_map)),
        tensors=tuple(entries),
        shards=(),
        metadata=metadata,
        created="",
        provenance={},
    )
    return ManifestSource(Format.SAFETENSORS_SHARDED, path, storage, manifest, shard_keys)
