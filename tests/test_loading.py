"""torchkeep.load: format detection, placement, casting, zero-copy mapping and typed errors."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch

import torchkeep
from tests.conftest import assert_same, reseal, train_state
from torchkeep.manifest import FORMAT_VERSION


def test_reads_plain_torch_zip_and_legacy_files(tmp_path: Any) -> None:
    state = train_state()
    state["rng"].pop("numpy")
    torch.save(state, tmp_path / "zip.pth")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert_same(state, torchkeep.load(tmp_path / "zip.pth"))
    assert_same(state, torchkeep.load(tmp_path / "legacy.pt"))
    assert torchkeep.inspect(tmp_path / "legacy.pt").format == "torch-legacy"
    assert torchkeep.inspect(tmp_path / "zip.pth").format == "torch-zip"


def test_format_is_detected_from_bytes_not_name(tmp_path: Any) -> None:
    torch.save({"x": torch.ones(2)}, tmp_path / "weights.bin")
    safetensors.torch.save_file({"y": torch.ones(2)}, tmp_path / "weights.data")
    assert torch.equal(torchkeep.load(tmp_path / "weights.bin")["x"], torch.ones(2))
    assert torch.equal(torchkeep.load(tmp_path / "weights.data")["y"], torch.ones(2))


def test_reads_foreign_safetensors_as_flat_dict(tmp_path: Any) -> None:
    tensors = {"b.weight": torch.randn(3, 2), "a.bias": torch.arange(4, dtype=torch.int32)}
    safetensors.torch.save_file(tensors, tmp_path / "m.safetensors", metadata={"source": "hub"})
    loaded = torchkeep.load(tmp_path / "m.safetensors")
    assert loaded.keys() == tensors.keys()
    for k in tensors:
        assert torch.equal(loaded[k], tensors[k])
    info = torchkeep.inspect(tmp_path / "m.safetensors")
    assert info.metadata == {"source": "hub"} and info.format_version is None
    report = torchkeep.verify(tmp_path / "m.safetensors")
    assert report.method == "structure" and report.tensors == 2


def test_reads_sharded_safetensors_with_index(tmp_path: Any) -> None:
    model = tmp_path / "model"
    model.mkdir()
    parts = {
        "model-00001-of-00002.safetensors": {"a": torch.ones(2)},
        "model-00002-of-00002.safetensors": {"b": torch.zeros(3)},
    }
    weight_map = {}
    for file, tensors in parts.items():
        safetensors.torch.save_file(tensors, model / file)
        weight_map.update(dict.fromkeys(tensors, file))
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for path in (model, model / "model.safetensors.index.json"):
        loaded = torchkeep.load(path)
        assert torch.equal(loaded["a"], torch.ones(2)) and torch.equal(loaded["b"], torch.zeros(3))
    info = torchkeep.inspect(model)
    assert info.format == "safetensors-sharded" and info.format_version is None


def test_sharded_index_may_not_point_outside_its_directory(tmp_path: Any) -> None:
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../secret.safetensors"}}))
    with pytest.raises(torchkeep.CorruptCheckpointError, match="not a file beside the index"):
        torchkeep.load(tmp_path / "m.safetensors.index.json")


def test_map_location_forms(tmp_path: Any) -> None:
    torchkeep.save({"x": torch.ones(2)}, tmp_path / "ckpt")
    torchkeep.save({"x": torch.ones(2)}, tmp_path / "ckpt.pth")
    for path in (tmp_path / "ckpt", tmp_path / "ckpt.pth"):
        assert torchkeep.load(path, map_location="cpu")["x"].device.type == "cpu"
        assert torchkeep.load(path, map_location=torch.device("cpu"))["x"].device.type == "cpu"
        assert torchkeep.load(path, map_location={"cuda:0": "cpu"})["x"].device.type == "cpu"
        seen: list[str] = []
        torchkeep.load(path, map_location=lambda tensor, location, seen=seen: seen.append(location) or tensor)
        assert seen == ["cpu"]


def test_map_location_to_a_missing_device_is_a_clear_error(tmp_path: Any) -> None:
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")  # pragma: no cover
    torchkeep.save({"x": torch.ones(2)}, tmp_path / "ckpt")
    with pytest.raises(torchkeep.InvalidArgumentError, match='map_location="cpu"'):
        torchkeep.load(tmp_path / "ckpt", map_location="cuda:0")


def test_saved_device_is_recorded_and_loads_on_cpu_by_default(tmp_path: Any) -> None:
    torchkeep.save({"x": torch.ones(2)}, tmp_path / "ckpt")
    edit_manifest(tmp_path / "ckpt", lambda m: m["tensors"][0].update(device="cuda:3"))  # as if saved on a GPU
    assert torchkeep.load(tmp_path / "ckpt")["x"].device.type == "cpu"
    assert torchkeep.inspect(tmp_path / "ckpt").tensors[0].device == "cuda:3"
    with pytest.raises(torchkeep.InvalidArgumentError, match="cuda:3"):
        torchkeep.load(tmp_path / "ckpt", map_location={"cuda:0": "cpu"})


@pytest.mark.parametrize("name", ["ckpt", "ckpt.safetensors", "ckpt.pth"])
def test_dtype_casts_floating_tensors_only(tmp_path: Any, name: str) -> None:
    torchkeep.save(
        {"w": torch.randn(3), "i": torch.arange(3), "nested": [torch.ones(1, dtype=torch.float64)]}, tmp_path / name
    )
    loaded = torchkeep.load(tmp_path / name, dtype=torch.bfloat16)
    assert loaded["w"].dtype == torch.bfloat16
    assert loaded["nested"][0].dtype == torch.bfloat16
    assert loaded["i"].dtype == torch.int64


def test_native_load_is_memory_mapped_and_copy_on_write(tmp_path: Any) -> None:
    torchkeep.save({"w": torch.zeros(1024, 1024)}, tmp_path / "ckpt")
    loaded = torchkeep.load(tmp_path / "ckpt")
    w = loaded["w"]
    maps = pathlib.Path(f"/proc/{os.getpid()}/maps").read_text()
    shard = str(tmp_path / "ckpt" / "data-00000.safetensors")
    mapping = [line for line in maps.splitlines() if line.endswith(shard)]
    assert mapping, "the shard is not memory-mapped"
    start, end = (int(x, 16) for x in mapping[0].split()[0].split("-"))
    assert start <= w.data_ptr() < end
    w.add_(1)  # writable, and the file stays as it was
    assert torch.equal(torchkeep.load(tmp_path / "ckpt")["w"], torch.zeros(1024, 1024))
    torchkeep.verify(tmp_path / "ckpt")


def test_verify_false_skips_checksums(tmp_path: Any) -> None:
    torchkeep.save({"w": torch.zeros(16)}, tmp_path / "ckpt")
    flip_byte(tmp_path / "ckpt" / "data-00000.safetensors", -1)
    with pytest.raises(torchkeep.ChecksumMismatchError):
        torchkeep.load(tmp_path / "ckpt")
    assert torchkeep.load(tmp_path / "ckpt", verify=False)["w"].shape == (16,)


def edit_manifest(directory: Any, change: Any) -> None:
    """Rewrite a manifest as a writer would have (under a fresh digest, so the edit itself is tested)."""
    path = pathlib.Path(directory) / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_bytes(reseal(manifest))


def flip_byte(path: Any, offset: int) -> None:
    data = bytearray(pathlib.Path(path).read_bytes())
    data[offset] ^= 0x40
    pathlib.Path(path).write_bytes(bytes(data))


# --- damage: every kind raises a typed error naming the file ---------------------------


def test_missing_path(tmp_path: Any) -> None:
    with pytest.raises(torchkeep.CheckpointNotFoundError) as err:
        torchkeep.load(tmp_path / "nope")
    assert isinstance(err.value, FileNotFoundError)
    assert err.value.path == str(tmp_path / "nope")


def test_directory_without_manifest_is_not_a_checkpoint(tmp_path: Any) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "data-00000.safetensors").write_bytes(b"x")
    with pytest.raises(torchkeep.CheckpointNotFoundError, match=r"manifest\.json"):
        torchkeep.load(tmp_path / "half")


@pytest.mark.parametrize("name", ["ckpt", "ckpt.safetensors"])
def test_flipped_data_byte_names_the_tensor(tmp_path: Any, name: str) -> None:
    torchkeep.save({"good": torch.ones(8), "bad": torch.zeros(8, dtype=torch.float64)}, tmp_path / name)
    target = tmp_path / name / "data-00000.safetensors" if name == "ckpt" else tmp_path / name
    flip_byte(target, os.path.getsize(target) - 40)  # inside "bad", laid out first (8-byte items)
    with pytest.raises(torchkeep.ChecksumMismatchError) as err:
        torchkeep.load(tmp_path / name)
    assert err.value.damaged == ["bad"]
    assert "'bad'" in str(err.value) and name in str(err.value)
    with pytest.raises(torchkeep.ChecksumMismatchError):
        torchkeep.verify(tmp_path / name)


def test_every_damaged_tensor_is_listed_at_once(tmp_path: Any) -> None:
    torchkeep.save({f"t{i}": torch.full((4,), float(i)) for i in range(3)}, tmp_path / "ckpt")
    shard = tmp_path / "ckpt" / "data-00000.safetensors"
    size = os.path.getsize(shard)
    for i in range(3):
        flip_byte(shard, size - 16 * i - 1)
    with pytest.raises(torchkeep.ChecksumMismatchError) as err:
        torchkeep.verify(tmp_path / "ckpt")
    assert sorted(err.value.damaged) == ["t0", "t1", "t2"]


@pytest.mark.parametrize("name", ["ckpt", "ckpt.safetensors", "ckpt.pth"])
def test_truncated_files_raise_corrupt(tmp_path: Any, name: str) -> None:
    torchkeep.save({"w": torch.randn(64, 64), "n": 3}, tmp_path / name)
    target = tmp_path / name / "data-00000.safetensors" if name == "ckpt" else tmp_path / name
    full = target.read_bytes()
    for length in (0, 7, 8, 100, len(full) // 2, len(full) - 1):
        target.write_bytes(full[:length])
        with pytest.raises(torchkeep.CorruptCheckpointError) as err:
            torchkeep.load(tmp_path / name)
        assert err.value.path is not None


@pytest.mark.parametrize(
    ("suffix", "error", "message"),
    [
        ("", torchkeep.UnsupportedFormatError, "is not a checkpoint torchkeep can read"),
        (".safetensors", torchkeep.CorruptCheckpointError, "is not a valid safetensors file"),
        (".pth", torchkeep.CorruptCheckpointError, "is not a readable torch file"),
        (".pt", torchkeep.CorruptCheckpointError, "is not a readable torch file"),
        (".bin", torchkeep.CorruptCheckpointError, "is not a readable torch file"),
        (".ckpt", torchkeep.CorruptCheckpointError, "is not a readable torch file"),
        (".data", torchkeep.UnsupportedFormatError, "is not a checkpoint torchkeep can read"),
    ],
)
def test_random_bytes_raise_typed_errors(tmp_path: Any, suffix: str, error: type[Exception], message: str) -> None:
    rng = np.random.default_rng(0)
    for i in range(20):
        path = tmp_path / f"random{i}{suffix}"
        path.write_bytes(rng.integers(0, 256, int(rng.integers(0, 4096)), dtype=np.uint8).tobytes())
        with pytest.raises(error, match=message):
            torchkeep.load(path)


@pytest.mark.parametrize(
    "manifest",
    [
        b"",
        b"{",
        b"[]",
        b"null",
        b'{"format": "other"}',
        b"\xff\xfe",
        json.dumps({"format": "torchkeep.checkpoint"}).encode(),
    ],
)
def test_garbage_manifest_raises_typed_error(tmp_path: Any, manifest: bytes) -> None:
    torchkeep.save({"w": torch.ones(2)}, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "manifest.json").write_bytes(manifest)
    with pytest.raises((torchkeep.CorruptCheckpointError, torchkeep.UnsupportedFormatError)):
        torchkeep.load(tmp_path / "ckpt")


def test_manifest_edits_that_break_structure_are_caught(tmp_path: Any) -> None:
    torchkeep.save({"w": torch.ones(4)}, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "manifest.json"
    good = json.loads(path.read_text())
    edits = [
        ("tensors", 0, "shape", [5]),
        ("tensors", 0, "offsets", [0, 10**12]),
        ("tensors", 0, "dtype", "float99"),
        ("tensors", 0, "shard", "../../etc/passwd"),
        ("shards", 0, "file", "../elsewhere.safetensors"),
        ("shards", 0, "size", 1),
    ]
    for section, index, field, value in edits:
        bad = json.loads(json.dumps(good))
        bad[section][index][field] = value
        path.write_bytes(reseal(bad))  # a fresh digest: the structural checks are tested, not the digest
        with pytest.raises(torchkeep.CorruptCheckpointError):
            torchkeep.load(tmp_path / "ckpt")


def test_edited_manifest_fails_its_checksum(tmp_path: Any) -> None:
    torchkeep.save({"w": torch.ones(2), "lr": 0.1}, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "manifest.json"
    path.write_text(path.read_text().replace("0.1", "0.2"))
    with pytest.raises(torchkeep.ChecksumMismatchError) as err:
        torchkeep.load(tmp_path / "ckpt")
    assert err.value.damaged == ["manifest.json"]


def test_newer_format_version_is_refused(tmp_path: Any) -> None:
    torchkeep.save({"w": torch.ones(2)}, tmp_path / "ckpt")
    edit_manifest(tmp_path / "ckpt", lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(torchkeep.UnsupportedFormatError, match="Upgrade torchkeep"):
        torchkeep.load(tmp_path / "ckpt")


def test_unknown_tree_node_is_refused(tmp_path: Any) -> None:
    torchkeep.save({"w": 1}, tmp_path / "ckpt")
    edit_manifest(tmp_path / "ckpt", lambda m: m["tree"]["items"][0].__setitem__(1, {"t": "pickle", "data": "..."}))
    with pytest.raises(
        torchkeep.CorruptCheckpointError, match=r"damaged at state\[\"w\"\]: unknown node type 'pickle'"
    ):
        torchkeep.load(tmp_path / "ckpt")


class Payload:
    def __reduce__(self) -> Any:
        return (os.system, ("touch should-not-exist",))


def test_pickle_payload_in_pth_is_refused_without_running(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save({"x": Payload()}, tmp_path / "evil.pth")
    with open(tmp_path / "evil-legacy.pt", "wb") as f:
        torch.save({"x": Payload()}, f, _use_new_zipfile_serialization=False)
    for name in ("evil.pth", "evil-legacy.pt"):
        with pytest.raises(torchkeep.UnsafeCheckpointError, match="never runs pickled code"):
            torchkeep.load(tmp_path / name)
    assert not (tmp_path / "should-not-exist").exists()
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(torchkeep.UnsafeCheckpointError, match=r"is a plain pickle.*never unpickles arbitrary data"):
        torchkeep.load(plain)
    assert not (tmp_path / "should-not-exist").exists()


def test_damaged_pth_record_fails_verify(tmp_path: Any) -> None:
    torchkeep.save({"w": torch.zeros(4096)}, tmp_path / "ckpt.pth")
    data = bytearray((tmp_path / "ckpt.pth").read_bytes())
    at = data.find(bytes(64))  # inside the tensor's zero bytes
    data[at + 10] = 1
    (tmp_path / "ckpt.pth").write_bytes(bytes(data))
    with pytest.raises(torchkeep.ChecksumMismatchError):
        torchkeep.verify(tmp_path / "ckpt.pth")


def test_inspect_reads_no_tensor_data(tmp_path: Any) -> None:
    state = {"model": {"w": torch.randn(8, 4)}, "step": 10, "arr": np.zeros(3)}
    torchkeep.save(state, tmp_path / "ckpt", metadata={"run": "a"})
    # Destroy the data: inspect still works, because it never reads it.
    shard = tmp_path / "ckpt" / "data-00000.safetensors"
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.seek(size - 8)
        f.write(b"\xff" * 8)
    info = torchkeep.inspect(tmp_path / "ckpt")
    assert info.format == "torchkeep" and info.format_version == 1
    assert info.metadata == {"run": "a"}
    assert info.tree["step"] == 10
    assert info.tree["model"]["w"].shape == (8, 4) and info.tree["model"]["w"].dtype == "float32"
    assert info.tree["arr"].kind == "numpy"
    assert info.nbytes == 8 * 4 * 4 + 3 * 8
    assert "model.w" in str(info)
