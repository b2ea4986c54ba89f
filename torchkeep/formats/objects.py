"""The content-addressed object folder that lets a manager's checkpoints share unchanged tensors.

``DIR/objects/<xxh3-128 of the bytes>.safetensors`` holds one tensor (named
``data``) as a safetensors file. A checkpoint written incrementally refers to
an object instead of writing the tensor again when the same bytes are already
stored. Objects are immutable (the name is the content) and written
atomically; the manager deletes an object only when no committed checkpoint
refers to it, after each commit (mark and sweep), so a crash at any point
leaves at worst unreferenced objects, removed by the next sweep.
"""

from __future__ import annotations

import dataclasses
import re

import xxhash

from torchkeep.errors import TorchkeepError
from torchkeep.formats.shard import PlannedTensor, leaf_bytes, read_header, write_shard
from torchkeep.integrity import checksum
from torchkeep.manifest import ShardEntry, TensorEntry
from torchkeep.storage import Storage, join_key
from torchkeep.tree import ArrayLeaf

__all__ = ["OBJECTS", "OBJECT_TENSOR", "is_object_name", "store_object"]

OBJECTS = "objects"
OBJECT_TENSOR = "data"
_OBJECT_NAME = re.compile(r"^[0-9a-f]{32}\.safetensors$")


def is_object_name(name: str) -> bool:
    """Whether ``name`` is a well-formed object file name (no path can hide in it)."""
    return bool(_OBJECT_NAME.match(name))


def store_object(storage: Storage, folder: str, planned: PlannedTensor) -> tuple[TensorEntry, ShardEntry, bool]:
    """Store one tensor in the object folder unless its bytes are there already.

    Content identity is the 128-bit xxh3 hash of the bytes, never the short
    integrity checksum. An object already there is shared only after its
    bytes are read back and hash to its name; a damaged one is rewritten
    (atomically, so checkpoints already referring to it are repaired too).
    Returns the manifest entries and whether bytes were written.
    """
    data = leaf_bytes(planned.leaf.value)
    digest = xxhash.xxh3_128_hexdigest(data)
    name = f"{digest}.safetensors"
    key = join_key(folder, name)
    written = False
    if not (storage.exists(key) and _intact(storage, key, digest, planned.nbytes)):
        renamed = dataclasses.replace(planned, leaf=ArrayLeaf(OBJECT_TENSOR, planned.leaf.value))
        with storage.begin(key, directory=False) as txn, txn.open() as f:
            write_shard(f, [renamed], name, {"format": "pt"})
        written = True
    entry = TensorEntry(
        name=planned.name, kind=planned.kind, dtype=planned.dtype, shape=planned.shape, nbytes=planned.nbytes,
        shard=name, offsets=(0, planned.nbytes), checksum=checksum(data), device=planned.device,
    )  # fmt: skip
    return entry, ShardEntry(file=name, size=storage.size(key), shared=True), written


def _intact(storage: Storage, key: str, digest: str, nbytes: int) -> bool:
    """Whether the stored object holds exactly the bytes its name promises."""
    try:
        header = read_header(storage, key)
        stored = header.tensors.get(OBJECT_TENSOR)
        if stored is None or stored.data_offsets != (0, nbytes) or header.size != header.data_start + nbytes:
            return False
        data = storage.read(key, header.data_start, nbytes)
    except TorchkeepError:
        return False
    return len(data) == nbytes and xxhash.xxh3_128_hexdigest(data) == digest
