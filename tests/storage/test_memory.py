"""MemoryStorage names: every store has one, its addresses resolve back to it, and only URL stores live forever."""

from __future__ import annotations

import gc
import uuid
import weakref

import pytest

import torchkeep
from torchkeep.storage import MemoryStorage, resolve


def write(storage: MemoryStorage, key: str, data: bytes) -> None:
    with storage.begin(key, directory=False) as txn, txn.open() as f:
        f.write(data)


def test_a_user_made_store_describes_keys_that_resolve_back_to_it() -> None:
    storage = MemoryStorage()
    write(storage, "run/w.bin", b"abc")
    address = storage.describe("run/w.bin")
    assert address.startswith("memory://") and storage.name in address
    found, key = resolve(address)
    assert found is storage and key == "run/w.bin"
    assert found.read(key) == b"abc"


def test_user_made_stores_get_different_names() -> None:
    a, b = MemoryStorage(), MemoryStorage()
    assert a.name != b.name
    assert resolve(a.describe("k"))[0] is a and resolve(b.describe("k"))[0] is b


def test_a_url_store_describes_its_own_url() -> None:
    name = f"url-{uuid.uuid4().hex[:8]}"
    storage, key = resolve(f"memory://{name}/run/a")
    assert isinstance(storage, MemoryStorage) and storage.name == name
    assert storage.describe(key) == f"memory://{name}/run/a"
    assert resolve(f"memory://{name}/other")[0] is storage


def test_an_explicit_name_is_its_address() -> None:
    name = f"explicit-{uuid.uuid4().hex[:8]}"
    storage = MemoryStorage(name=name)
    assert storage.describe("x/y") == f"memory://{name}/x/y"
    assert resolve(f"memory://{name}/x/y") == (storage, "x/y")
    assert name in repr(storage)


def test_a_name_in_use_is_refused() -> None:
    name = f"taken-{uuid.uuid4().hex[:8]}"
    storage = MemoryStorage(name=name)
    with pytest.raises(torchkeep.InvalidArgumentError, match=name):
        MemoryStorage(name=name)
    url_store, _ = resolve(f"memory://{name}-url/k")
    with pytest.raises(torchkeep.InvalidArgumentError, match="already"):
        MemoryStorage(name=f"{name}-url")
    assert resolve(f"memory://{name}/k")[0] is storage and resolve(f"memory://{name}-url/k")[0] is url_store


@pytest.mark.parametrize("name", ["", "a/b", "a://b", 7])
def test_a_bad_name_is_refused(name: object) -> None:
    with pytest.raises(torchkeep.InvalidArgumentError, match="name"):
        MemoryStorage(name=name)  # type: ignore[arg-type]


def test_a_user_made_store_is_not_kept_alive() -> None:
    storage = MemoryStorage()
    name, ref = storage.name, weakref.ref(storage)
    del storage
    gc.collect()
    assert ref() is None
    fresh, _ = resolve(f"memory://{name}/k")  # the name is free again: a new, empty store
    assert fresh.list("") == []
    reused = MemoryStorage(name="reusable-" + uuid.uuid4().hex[:8])
    reused_name = reused.name
    del reused
    gc.collect()
    assert MemoryStorage(name=reused_name).name == reused_name


def test_a_url_store_lives_for_the_process() -> None:
    name = f"kept-{uuid.uuid4().hex[:8]}"
    storage, _ = resolve(f"memory://{name}/k")
    write(storage, "k", b"kept")
    ref = weakref.ref(storage)
    del storage
    gc.collect()
    assert ref() is not None
    assert resolve(f"memory://{name}/k")[0].read("k") == b"kept"
