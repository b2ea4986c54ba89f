"""The manifest's two written forms: the sealed compact one, and the older checksummed one still read."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
import torch

import torchkeep
from tests.conftest import assert_same, reseal
from torchkeep.manifest import MANIFEST_CHECKSUM, MANIFEST_DIGEST, Manifest, _canonical_checksum, encode_sorted, seal


def saved(tmp_path: Path, state: object = None) -> Path:
    torchkeep.save({"w": torch.arange(4.0), "lr": 1e-5} if state is None else state, tmp_path / "ckpt")
    return tmp_path / "ckpt" / "manifest.json"


def body_of(raw: bytes) -> bytes:
    return raw.rpartition(b',"manifest_digest"')[0] + b"}"


def test_written_form_is_compact_sorted_and_sealed(tmp_path: Path) -> None:
    raw = saved(tmp_path).read_bytes()
    assert raw == seal(body_of(raw))
    assert encode_sorted(json.loads(body_of(raw))) == body_of(raw)
    assert json.loads(raw)[MANIFEST_DIGEST]


@pytest.mark.parametrize(
    "edit",
    [
        lambda body: body.replace(b'"format_version":1,', b'"format_version":1,"format_version":1,'),  # a repeat
        lambda body: body.replace(b'"format_version":1,', b'"format_version": 1,'),  # other spacing
        lambda body: body.replace(b'"format_version":1,', b'"format_version":1,"zzz":0,'),  # an unknown field
        lambda body: body.replace(b'"lr"', b'"\\u006cr"'),  # the same text escaped otherwise
    ],
    ids=["repeated-key", "spacing", "unknown-field", "escaped"],
)
def test_a_sealed_manifest_is_read_only_in_the_form_it_was_written(tmp_path: Path, edit: object) -> None:
    path = saved(tmp_path)
    body = body_of(path.read_bytes())
    changed = edit(body)  # type: ignore[operator]
    assert changed != body
    path.write_bytes(seal(changed))  # the digest matches: only the form gives it away
    with pytest.raises(torchkeep.CorruptCheckpointError, match="damaged"):
        torchkeep.load(tmp_path / "ckpt")


def test_a_digest_outside_its_place_is_refused(tmp_path: Path) -> None:
    path = saved(tmp_path)
    path.write_text(json.dumps(json.loads(path.read_bytes()), indent=1))  # pretty-printed: the digest is no longer last
    with pytest.raises(torchkeep.CorruptCheckpointError, match="has a digest but not the form"):
        torchkeep.load(tmp_path / "ckpt")


def test_a_sealed_manifest_with_changed_bytes_fails_its_digest(tmp_path: Path) -> None:
    path = saved(tmp_path)
    path.write_bytes(path.read_bytes().replace(b"0.00001", b"0.00002"))
    with pytest.raises(torchkeep.ChecksumMismatchError) as err:
        torchkeep.load(tmp_path / "ckpt")
    assert err.value.damaged == ["manifest.json"]


def test_deep_nesting_in_a_sealed_manifest_is_refused(tmp_path: Path) -> None:
    path = saved(tmp_path)
    path.write_bytes(seal(body_of(path.read_bytes())[:-1] + b',"zz":' + b"[" * 100_000 + b"]" * 100_000 + b"}"))
    with pytest.raises(torchkeep.CorruptCheckpointError):
        torchkeep.load(tmp_path / "ckpt")


def test_the_older_checksummed_form_is_read_and_checked(tmp_path: Path) -> None:
    path = saved(tmp_path)
    data = json.loads(path.read_bytes())
    data.pop(MANIFEST_DIGEST)
    data[MANIFEST_CHECKSUM] = _canonical_checksum(data)
    path.write_text(json.dumps(data, indent=1))  # as torchkeep wrote it before the digest
    assert_same(torchkeep.load(tmp_path / "ckpt"), {"w": torch.arange(4.0), "lr": 1e-5})
    path.write_text(json.dumps(data, indent=1).replace("1e-05", "2e-05"))
    with pytest.raises(torchkeep.ChecksumMismatchError):
        torchkeep.load(tmp_path / "ckpt")


def test_a_lone_surrogate_is_written_in_the_older_form(tmp_path: Path) -> None:
    state = {"s\ud800": torch.ones(2), "text": "x\udfff"}
    raw = saved(tmp_path, state).read_bytes()
    assert MANIFEST_CHECKSUM.encode() in raw and MANIFEST_DIGEST.encode() not in raw
    assert_same(torchkeep.load(tmp_path / "ckpt"), state)


def test_schema_errors_name_the_field(tmp_path: Path) -> None:
    path = saved(tmp_path)
    data = json.loads(path.read_bytes())
    data["tensors"][0]["kind"] = "pickle"
    path.write_bytes(reseal(data))
    with pytest.raises(torchkeep.CorruptCheckpointError, match=r"tensors\[0\]\.kind"):
        torchkeep.load(tmp_path / "ckpt")


def test_a_manifest_round_trips_through_its_bytes() -> None:
    manifest = Manifest(tree={"t": "dict", "items": []}, tensors=(), shards=(), metadata={"a": [1.5, "é", None]})
    again = Manifest.from_bytes(manifest.to_bytes())
    assert again == manifest
    assert msgspec.to_builtins(again)["metadata"] == {"a": [1.5, "é", None]}


def test_the_pieces_of_a_sharded_tensor_must_cover_it_once() -> None:
    from torchkeep.manifest import Chunk, ChunkedTensor, ShardedManifest, ShardEntry, TensorEntry

    def piece(name: str, start: int) -> TensorEntry:
        return TensorEntry(name=name, kind="torch", dtype="float32", shape=(2, 4), nbytes=32, shard="r.safetensors",
                           offsets=(start, start + 32), checksum="0" * 16)  # fmt: skip

    def manifest(second_at: int, version: int = 3) -> bytes:
        chunks = (Chunk(entry="w@0,0", offsets=(0, 0)), Chunk(entry="w@2,0", offsets=(second_at, 0)))
        return bytes(ShardedManifest(
            tree={"t": "tensor", "name": "w"}, tensors=(piece("w@0,0", 0), piece("w@2,0", 32)),
            shards=(ShardEntry(file="r.safetensors", size=64),), format_version=version,
            chunked={"w": ChunkedTensor(dtype="float32", shape=(4, 4), chunks=chunks)},
        ).to_bytes())  # fmt: skip

    assert isinstance(Manifest.from_bytes(manifest(2)), ShardedManifest)
    with pytest.raises(torchkeep.CorruptCheckpointError, match="overlap"):
        Manifest.from_bytes(manifest(1))  # as many elements as the whole, but row 1 twice and row 3 never
    with pytest.raises(torchkeep.CorruptCheckpointError, match="format_version 1"):
        Manifest.from_bytes(manifest(2, version=1))
