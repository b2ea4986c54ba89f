"""One contract, every storage backend."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import torchkeep
from torchkeep.storage import LocalStorage, MemoryStorage, Storage
from torchkeep.storage.objectstore import ObjectStorage


@pytest.fixture(params=["local", "memory", "s3"])
def storage(request: Any, tmp_path: Any) -> Iterator[Storage]:
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        yield ObjectStorage("s3", bucket.removeprefix("s3://") + "/root")
        return
    yield LocalStorage(tmp_path / "root") if request.param == "local" else MemoryStorage()


def write(storage: Storage, key: str, objects: dict[str, bytes], directory: bool = True) -> None:
    txn = storage.begin(key, directory=directory)
    for name, data in objects.items():
        with txn.open(name) as f:
            f.write(data)
    txn.commit()


def test_backends_satisfy_the_protocol(storage: Storage) -> None:
    assert isinstance(storage, torchkeep.Storage)
    assert isinstance(storage.begin("x", directory=True), torchkeep.Transaction)


def test_directory_entry_round_trip(storage: Storage) -> None:
    write(storage, "run/a", {"one": b"111", "sub/two": b"2222"})
    assert storage.exists("run/a") and storage.is_dir("run/a")
    assert storage.list("run") == ["a"]
    assert storage.list("run/a") == ["one", "sub"]
    assert storage.read("run/a/sub/two") == b"2222"
    assert storage.read("run/a/sub/two", 1, 2) == b"22"
    assert storage.read("run/a/sub/two", 3) == b"2"
    assert storage.size("run/a/one") == 3


def test_single_object_entry(storage: Storage) -> None:
    write(storage, "w.safetensors", {"": b"abc"}, directory=False)
    assert storage.exists("w.safetensors") and not storage.is_dir("w.safetensors")
    assert storage.read("w.safetensors") == b"abc"


def test_nothing_is_visible_before_commit(storage: Storage) -> None:
    txn = storage.begin("run/a", directory=True)
    with txn.open("one") as f:
        f.write(b"x")
    assert not storage.exists("run/a")
    assert storage.list("run") == []
    txn.abort()
    assert storage.list("run") == []
    assert not storage.exists("run/a")


def test_commit_replaces_the_whole_entry(storage: Storage) -> None:
    write(storage, "a", {"old1": b"1", "old2": b"2"})
    txn = storage.begin("a", directory=True)
    with txn.open("new") as f:
        f.write(b"3")
    assert storage.list("a") == ["old1", "old2"]  # old entry whole until commit
    txn.commit()
    assert storage.list("a") == ["new"]


def test_read_into_fills_the_callers_buffer(storage: Storage) -> None:
    write(storage, "a", {"data": bytes(range(100))})
    buffer = bytearray(10)
    storage.read_into("a/data", 50, memoryview(buffer))
    assert bytes(buffer) == bytes(range(50, 60))
    with pytest.raises(torchkeep.CorruptCheckpointError, match="truncated"):
        storage.read_into("a/data", 95, memoryview(bytearray(10)))
    with pytest.raises(torchkeep.CheckpointNotFoundError):
        storage.read_into("a/nope", 0, memoryview(bytearray(1)))


def test_map_is_private_copy_on_write(storage: Storage) -> None:
    write(storage, "a", {"data": b"\x00" * 64})
    view = storage.map("a/data")
    view[0] = 7
    assert storage.read("a/data", 0, 1) == b"\x00"


def test_delete(storage: Storage) -> None:
    write(storage, "a", {"x": b"1"})
    write(storage, "b.bin", {"": b"1"}, directory=False)
    storage.delete("a")
    storage.delete("b.bin")
    storage.delete("never-was")
    assert storage.list() == []


def test_missing_keys_raise_not_found(storage: Storage) -> None:
    for call in (lambda: storage.read("nope"), lambda: storage.size("nope"), lambda: storage.map("nope")):
        with pytest.raises(torchkeep.CheckpointNotFoundError):
            call()
    assert not storage.exists("nope")


@pytest.mark.parametrize("key", ["../escape", "a/../../b", "/abs", "a//b", "a/./b", "nul\x00"])
def test_bad_keys_are_refused(storage: Storage, key: str) -> None:
    with pytest.raises(torchkeep.InvalidArgumentError):
        storage.begin(key, directory=True)


def test_finished_transaction_cannot_be_reused(storage: Storage) -> None:
    txn = storage.begin("a", directory=True)
    txn.commit()
    with pytest.raises(torchkeep.InvalidArgumentError):
        txn.open("x")
    with pytest.raises(torchkeep.InvalidArgumentError):
        txn.commit()
