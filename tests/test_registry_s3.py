"""The registry on an object store (moto's S3 server on 127.0.0.1): its index as a local cache, and
concurrent registrations from two processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep
from torchkeep.registry import _cache_name

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("TORCHKEEP_CACHE_DIR", str(folder))
    return folder


def weights(i: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4,), float(i))}


def test_the_index_of_a_remote_registry_is_a_local_cache(s3_bucket: str, cache: Path) -> None:
    url = f"{s3_bucket}/reg"
    registry = torchkeep.Registry(url)
    registry.register("m", weights(1), metadata={"accuracy": 0.5})
    registry.register("m", weights(2), metadata={"accuracy": 0.9}, aliases=["prod"])
    assert [p.name for p in cache.glob("*.sqlite")] == [_cache_name(url)]  # one file, named by the URL's hash
    again = torchkeep.Registry(url)  # another process would find the same cache
    assert [v.version for v in again.versions("m")] == [1, 2]
    assert again.get("m", "prod").version == 2
    assert [v.version for v in again.search(where={"accuracy": (">", 0.6)})] == [2]
    assert torchkeep.Registry(f"{s3_bucket}/other").models() == []  # another URL, another cache


def test_the_cache_never_answers_what_the_store_no_longer_holds(s3_bucket: str, cache: Path) -> None:
    """Guard: _query checks the cache's fingerprints and stamps against the store before answering."""
    url = f"{s3_bucket}/reg"
    registry = torchkeep.Registry(url)
    for i in (1, 2, 3):
        registry.register("m", weights(i), aliases=["prod"])
    assert [v.version for v in registry.versions("m")] == [1, 2, 3]
    # Another machine, with a cache of its own, changes the store behind this cache's back.
    other = torchkeep.Registry(url, cache_dir=cache / "elsewhere")
    other.delete("m", 3, force=True)
    other.set_alias("m", "prod", 1)
    assert [v.version for v in registry.versions("m")] == [1, 2]
    assert registry.get("m", "prod").version == 1
    assert registry.get("m").version == 2
    registry.set_alias("m", "prod", 1)  # written through this cache
    other.set_alias("m", "prod", 2)  # moved between two unchanged versions: only the fingerprint tells
    assert registry.get("m", "prod").version == 2
    # A version replaced in place on the store (same number, other contents) is read anew.
    key = f"{url}/models/m/v2"
    record = dict(torchkeep.inspect(key).metadata["registry"], metadata={"changed": True})
    torchkeep.save(weights(7), key, metadata={"registry": record})
    assert registry.get("m", 2).metadata == {"changed": True}
    assert torch.equal(registry.load("m", 2)["w"], weights(7)["w"])


def test_a_cache_that_cannot_be_written_leaves_reads_to_the_store(s3_bucket: str, tmp_path: Path) -> None:
    url = f"{s3_bucket}/reg"
    torchkeep.Registry(url, cache_dir=tmp_path / "a").register("m", weights(1))
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    registry = torchkeep.Registry(url, cache_dir=blocked / "cache")  # cannot be made: the index is in memory
    assert registry.get("m").version == 1
    registry.register("m", weights(2))
    assert [v.version for v in registry.versions("m")] == [1, 2]


def test_a_version_number_taken_behind_the_lock_is_skipped(
    s3_bucket: str, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guard: register's existence check and its retry on CheckpointExistsError from the commit marker's
    conditional put. Another writer commits the very version this one is uploading (a lease lost to expiry)."""
    url = f"{s3_bucket}/reg"
    registry = torchkeep.Registry(url)
    registry.register("m", weights(1))
    storage: Any = registry._storage
    real_begin = storage.begin
    raced: list[str] = []

    def begin(key: str, *, directory: bool) -> Any:
        txn = real_begin(key, directory=directory)
        if key.endswith("models/m/v2") and not raced:
            raced.append(key)  # the marker is absent now; another writer commits it before this one does
            torchkeep.save(weights(99), f"{url}/models/m/v2")
        return txn

    monkeypatch.setattr(storage, "begin", begin)
    v = registry.register("m", weights(2), metadata={"mine": True})
    assert raced and v.version == 3 and v.metadata == {"mine": True}
    assert torch.equal(registry.load("m", 3)["w"], weights(2)["w"])
    assert torch.equal(torchkeep.load(f"{url}/models/m/v2")["w"], weights(99)["w"])  # theirs, untouched


def test_a_stale_next_number_is_skipped(s3_bucket: str, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard: register checks that the version it is about to write is absent (save would replace it)."""
    registry = torchkeep.Registry(f"{s3_bucket}/reg")
    registry.register("m", weights(1))
    monkeypatch.setattr(registry, "_next_version", lambda name: (1, False, "[]"))
    assert registry.register("m", weights(2)).version == 2
    assert torch.equal(registry.load("m", 1)["w"], weights(1)["w"])  # v1 was not replaced


WORKER = textwrap.dedent(
    """
    import sys, torch, torchkeep
    registry = torchkeep.Registry(sys.argv[1])
    for i in range(int(sys.argv[3])):
        registry.register("shared", {"w": torch.full((4,), float(i))}, metadata={"writer": sys.argv[2], "i": i})
    """
)


@pytest.mark.slow
def test_two_processes_registering_on_s3_get_distinct_versions(s3_bucket: str, cache: Path) -> None:
    url = f"{s3_bucket}/reg"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, writer, "20"], cwd=ROOT, stderr=subprocess.PIPE, env=dict(os.environ)
        )
        for writer in ("a", "b")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-3000:]
    versions = torchkeep.Registry(url).versions("shared")
    assert [v.version for v in versions] == list(range(1, 41))  # distinct, none lost
    assert {(v.metadata["writer"], v.metadata["i"]) for v in versions} == {(w, i) for w in "ab" for i in range(20)}
