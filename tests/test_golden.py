"""Checkpoints written by format version 1 load forever, and the bytes we define stay put."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import safetensors.torch

import torchkeep
from tests.conftest import assert_same
from tests.golden import GOLDEN_METADATA, golden_state
from torchkeep.integrity import checksum
from torchkeep.manifest import Manifest

DATA = Path(__file__).resolve().parent / "data"


def test_golden_native_v1_loads() -> None:
    loaded = torchkeep.load(DATA / "golden-v1")
    assert_same(golden_state(), loaded)
    assert loaded["model"]["embed.weight"] is loaded["model"]["head.weight"]
    info = torchkeep.inspect(DATA / "golden-v1")
    assert info.format_version == 1 and info.metadata == GOLDEN_METADATA
    assert torchkeep.verify(DATA / "golden-v1").method == "xxh3-64"


def test_golden_safetensors_v1_loads() -> None:
    assert_same(golden_state(), torchkeep.load(DATA / "golden-v1.safetensors"))
    torchkeep.verify(DATA / "golden-v1.safetensors")


def test_golden_shard_opens_in_safetensors() -> None:
    tensors = safetensors.torch.load_file(DATA / "golden-v1" / "data-00000.safetensors")
    assert_same(golden_state()["model"]["norm.bias"], tensors["model.norm.bias"])


def test_shard_byte_layout_is_stable(tmp_path: Path) -> None:
    """Saving the golden state today writes the very same shard bytes as format version 1 did."""
    torchkeep.save(golden_state(), tmp_path / "again")
    assert (tmp_path / "again" / "data-00000.safetensors").read_bytes() == (
        DATA / "golden-v1" / "data-00000.safetensors"
    ).read_bytes()
    raw = (DATA / "golden-v1" / "data-00000.safetensors").read_bytes()
    length = int.from_bytes(raw[:8], "little")
    assert length % 8 == 0
    assert raw[8:40] == b'{"__metadata__":{"format":"pt"},'
    header = json.loads(raw[8 : 8 + length])
    # 8-byte element types come first, so every tensor is aligned to its element size.
    offsets = [header[k]["data_offsets"][0] for k in header if k != "__metadata__"]
    assert offsets == sorted(offsets)


def test_manifest_is_stable_apart_from_provenance(tmp_path: Path) -> None:
    torchkeep.save(golden_state(), tmp_path / "again", metadata=GOLDEN_METADATA)
    raw = (tmp_path / "again" / "manifest.json").read_bytes()
    now = Manifest.from_bytes(raw)
    then = Manifest.from_bytes((DATA / "golden-v1" / "manifest.json").read_bytes())
    assert msgspec.structs.replace(now, created=then.created, provenance=then.provenance) == then
    # Written compact, keys sorted, closed by the digest of everything before it.
    body, _, digest = raw.rpartition(b',"manifest_digest":"')
    assert digest == checksum(body + b"}").encode() + b'"}'
    assert json.dumps(json.loads(body + b"}"), sort_keys=True, separators=(",", ":")).encode() == body + b"}"
