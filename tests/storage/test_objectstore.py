"""torchkeep on a real S3 endpoint (moto's server on 127.0.0.1): the same guarantees as on a local disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep
from tests.conftest import assert_same
from tests.s3 import Proxy, proxy_to
from torchkeep.storage import objectstore, resolve
from torchkeep.storage.objectstore import ObjectStorage

ROOT = Path(__file__).resolve().parents[2]


def state(seed: int = 0) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g), "step": seed}


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[Proxy]:
    with proxy_to(s3_endpoint) as p:
        yield p


def through(proxy: Proxy, bucket: str, folder: str = "run", *, client_retries: bool = True) -> ObjectStorage:
    """The bucket's ``folder`` reached through the proxy, so that its requests are seen (and failed on demand).

    Without ``client_retries`` the client (s3fs, botocore) tries each request once, so that any retry seen is
    torchkeep's own.
    """
    options: dict[str, object] = {"endpoint_url": proxy.url}
    if not client_retries:
        options["config_kwargs"] = {"retries": {"max_attempts": 1, "mode": "standard"}}
    storage = ObjectStorage("s3", f"{bucket.removeprefix('s3://')}/{folder}", storage_options=options)
    if not client_retries:
        storage.fs.retries = 1  # s3fs's own retry count is an attribute, not an option
    return storage


def objects(bucket: str) -> list[str]:
    storage, _ = resolve(f"{bucket}/x")
    assert isinstance(storage, ObjectStorage)
    return sorted(storage.fs.find(storage.root.split("/")[0]))


def test_save_load_verify_inspect_and_load_into(s3_bucket: str) -> None:
    for url in (f"{s3_bucket}/run/native", f"{s3_bucket}/run/one.safetensors"):
        torchkeep.save(state(1), url, metadata={"epoch": 3})
        assert_same(torchkeep.load(url), state(1))
        assert torchkeep.verify(url).tensors == 2
        assert torchkeep.inspect(url).metadata == {"epoch": 3}
    target = nn.Linear(32, 64)
    torchkeep.save(nn.Linear(32, 64).state_dict(), f"{s3_bucket}/run/linear")
    assert torchkeep.load_into(target, f"{s3_bucket}/run/linear").ok


def test_a_replaced_entry_is_whole_and_its_old_generation_goes(s3_bucket: str) -> None:
    url = f"{s3_bucket}/run/a"
    torchkeep.save(state(1), url)
    torchkeep.save(state(2), url)
    assert_same(torchkeep.load(url), state(2))
    generations = {name.split("/")[-2] for name in objects(s3_bucket) if "/.tk-data/" in name}
    assert len(generations) == 1  # the first one was removed after the marker moved


def test_a_damaged_object_is_found_by_its_checksum(s3_bucket: str) -> None:
    url = f"{s3_bucket}/run/a"
    torchkeep.save(state(1), url)
    storage, _ = resolve(url)
    assert isinstance(storage, ObjectStorage)
    shard = next(name for name in objects(s3_bucket) if name.endswith("data-00000.safetensors"))
    data = bytearray(storage.fs.cat_file(shard))
    data[-5] ^= 0xFF
    storage.fs.pipe_file(shard, bytes(data))
    with pytest.raises(torchkeep.ChecksumMismatchError):
        torchkeep.load(url)


KILLED_WRITER = """
import sys, time, torch, torchkeep
from torchkeep.storage import objectstore
url, flag, when = sys.argv[1], sys.argv[2], sys.argv[3]
manager = torchkeep.CheckpointManager(url)
manager.save(1, model={"w": torch.ones(4)})
def stall(*args, **kwargs):
    open(flag, "w").close()
    time.sleep(600)  # killed here
if when == "before-commit":  # every object uploaded and answered, the marker not yet written
    results = objectstore._Bounded.results
    def answered_then_stall(self):
        results(self)
        stall()
    objectstore._Bounded.results = answered_then_stall
    manager.save(2, model={"w": torch.full((1 << 20,), 2.0)})
else:  # mid-upload: the shard's multipart upload has sent its first part
    send = objectstore._Multipart.send
    def second_part_stalls(self, data):
        if self._parts:
            stall()
        send(self, data)
    objectstore._Multipart.send = second_part_stalls
    manager.save(2, model={"w": torch.full((24 << 20,), 2.0)})  # 96 MiB: a multipart shard
"""


@pytest.mark.parametrize("when", ["before-commit", "mid-upload"])
def test_a_writer_killed_while_saving_leaves_nothing_listed(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    url, flag = f"{s3_bucket}/ckpts", tmp_path / "uploading"
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, url, str(flag), when], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert child.poll() is None and time.monotonic() < deadline, "the writer never started uploading"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    if when == "before-commit":
        assert any("/.tk-data/step-00000002/" in name for name in objects(s3_bucket))  # its objects are there
    manager = torchkeep.CheckpointManager(url)
    assert [r.step for r in manager.list()] == [1]
    model = {"w": torch.zeros(4)}
    assert manager.restore(model=model).step == 1 and torch.equal(model["w"], torch.ones(4))
    # The next writer removes the abandoned upload once it is older than the grace period.
    monkeypatch.setattr(objectstore, "STALE_AFTER_S", 0.0)
    manager.save(3, model={"w": torch.ones(4)})
    manager.close()
    assert not any("/.tk-data/step-00000002/" in name for name in objects(s3_bucket))
    assert [r.step for r in torchkeep.CheckpointManager(url).list()] == [1, 3]


RACER = """
import sys, time, os, json, torch
from torchkeep.storage import resolve
from torchkeep.errors import CheckpointExistsError
url, me, folder = sys.argv[1], sys.argv[2], sys.argv[3]
storage, key = resolve(url)
txn = storage.begin(key, directory=True)
with txn.open("manifest.json") as f:
    f.write(me.encode())
open(os.path.join(folder, me), "w").close()
while len(os.listdir(folder)) < 2:  # both have uploaded before either commits
    time.sleep(0.01)
try:
    txn.commit()
    print(json.dumps({"me": me, "won": True}))
except CheckpointExistsError as err:
    print(json.dumps({"me": me, "won": False, "error": str(err)}))
"""


def test_two_writers_racing_for_one_entry_exactly_one_commits(s3_bucket: str, tmp_path: Path) -> None:
    url = f"{s3_bucket}/run/step-00000007"
    folder = tmp_path / "ready"
    folder.mkdir()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, url, me, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        for me in ("a", "b")
    ]
    results = [json.loads(child.communicate(timeout=120)[0]) for child in children]
    winners = [r["me"] for r in results if r["won"]]
    assert len(winners) == 1, results
    loser = next(r for r in results if not r["won"])
    assert "another writer" in loser["error"]
    storage, key = resolve(url)
    assert storage.read(f"{key}/manifest.json") == winners[0].encode()
    assert storage.list("") == ["step-00000007"]


def test_load_into_one_tensor_reads_only_its_range(s3_bucket: str, proxy: Proxy) -> None:
    storage = through(proxy, s3_bucket)
    big = torch.randn(4 << 20)  # 16 MiB
    torchkeep.save({"big": big, "small": torch.arange(16.0)}, "ckpt", storage=storage)
    proxy.seen.clear()
    target = nn.ParameterDict({"small": torch.zeros(16)})
    report = torchkeep.load_into(target, "ckpt", storage=storage, strict=False)
    assert report.unexpected == ["big"] and torch.equal(target["small"].detach(), torch.arange(16.0))
    fetched = sum(s.body_bytes for s in proxy.seen if s.method == "GET" and "data-00000" in s.path)
    assert 0 < fetched < 64 * 1024, f"{fetched} bytes of the shard were fetched for one 64-byte tensor"


@pytest.mark.parametrize("kind", ["503", "reset"])
def test_transient_failures_are_retried_and_the_save_succeeds(s3_bucket: str, proxy: Proxy, kind: str) -> None:
    storage = through(proxy, s3_bucket, client_retries=False)
    proxy.fail(4, kind, method="PUT")
    torchkeep.save(state(3), "ckpt", storage=storage)
    proxy.fail(3, kind, method="GET")
    assert_same(torchkeep.load("ckpt", storage=storage), state(3))
    if kind == "503":
        assert sum(s.status == 503 for s in proxy.seen) == 7


def test_a_failed_precondition_is_not_retried(s3_bucket: str, proxy: Proxy) -> None:
    storage = through(proxy, s3_bucket, client_retries=False)
    first, second = (storage.begin("step-1", directory=True) for _ in range(2))
    for txn in (first, second):
        with txn.open("manifest.json") as f:
            f.write(b"{}")
    first.commit()
    proxy.seen.clear()
    with pytest.raises(torchkeep.CheckpointExistsError, match="another writer"):
        second.commit()
    marker_puts = [s for s in proxy.seen if s.method == "PUT" and s.path.split("?")[0].endswith("/run/step-1")]
    assert [s.status for s in marker_puts] == [412]
    assert storage.list("") == ["step-1"]


def test_a_second_writer_is_refused_while_the_lease_is_held(s3_bucket: str) -> None:
    url = f"{s3_bucket}/ckpts"
    first = torchkeep.CheckpointManager(url)
    first.save(1, model={"w": torch.ones(2)})
    second = torchkeep.CheckpointManager(url)
    with pytest.raises(torchkeep.DirectoryLockedError, match=rf"pid {os.getpid()} on host"):
        second.save(2, model={"w": torch.ones(2)})
    assert [r.step for r in second.list()] == [1]  # reading needs no lock
    first.close()
    second.save(2, model={"w": torch.ones(2)})
    second.close()


def test_an_expired_lease_of_a_dead_holder_is_taken_over(s3_bucket: str) -> None:
    url = f"{s3_bucket}/ckpts"
    storage, key = resolve(url)
    assert isinstance(storage, ObjectStorage)
    dead = {"holder": "gone", "host": "elsewhere", "pid": 1, "expires": time.time() - 1}
    storage.put_if(f"{key}/.tk-lease-torchkeep.lock", json.dumps(dead).encode(), absent=True)
    manager = torchkeep.CheckpointManager(url)
    manager.save(1, model={"w": torch.ones(2)})
    manager.close()
    assert [r.step for r in torchkeep.CheckpointManager(url).list()] == [1]


def test_async_saves_upload_in_the_background(s3_bucket: str) -> None:
    model = nn.Linear(8, 8)
    with torchkeep.CheckpointManager(f"{s3_bucket}/ckpts", async_save=True, keep_last=2) as manager:
        for step in range(1, 5):
            manager.save(step, model=model)
        record = manager.wait()
    assert record is not None and record.step == 4
    fresh = nn.Linear(8, 8)
    restored = torchkeep.CheckpointManager(f"{s3_bucket}/ckpts")
    assert [r.step for r in restored.list()] == [3, 4]
    restored.restore(model=fresh)
    assert_same(fresh.state_dict(), model.state_dict())


def test_urls_name_a_key_and_unknown_schemes_list_the_known_ones() -> None:
    with pytest.raises(torchkeep.InvalidArgumentError, match="BUCKET/KEY"):
        resolve("s3://bucket-only")
    with pytest.raises(torchkeep.InvalidArgumentError, match=r"known schemes: .*s3://"):
        resolve("nosuch://bucket/key")


def test_credentials_never_appear_in_errors(s3_bucket: str, proxy: Proxy) -> None:
    secret = "sekrit-value-123"
    storage = ObjectStorage(
        "s3", f"{s3_bucket.removeprefix('s3://')}/run",
        storage_options={"endpoint_url": proxy.url, "key": "testing", "secret": secret,
                         "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}},
    )  # fmt: skip
    storage.fs.retries = 1  # only torchkeep's own retries, so that giving up comes quickly
    proxy.fail(50, "503")
    with pytest.raises(torchkeep.StorageError) as err:
        torchkeep.save(state(1), "ckpt", storage=storage)
    assert secret not in str(err.value) and secret not in repr(err.value)


def test_an_upload_that_stored_fewer_bytes_fails_the_save(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    storage, key = resolve(f"{s3_bucket}/run/a")
    assert isinstance(storage, ObjectStorage)
    pipe = storage.fs.pipe_file
    monkeypatch.setattr(storage.fs, "pipe_file", lambda path, data, **kw: pipe(path, data[:-1], **kw))
    with pytest.raises(torchkeep.StorageError, match="after its upload"):
        torchkeep.save(state(1), key, storage=storage)
    assert storage.list("") == []


def test_a_lease_is_renewed_while_held_and_free_once_released(s3_bucket: str) -> None:
    storage, key = resolve(f"{s3_bucket}/ckpts")
    assert isinstance(storage, ObjectStorage)
    held = objectstore.Lease(storage, key, "writer", blocking=False, holder="a test", ttl=0.9)
    time.sleep(1.5)  # past the first expiry: only renewal keeps it
    with pytest.raises(torchkeep.DirectoryLockedError, match="a test"):
        objectstore.Lease(storage, key, "writer", blocking=False, holder="a test", ttl=0.9)
    held.release()
    objectstore.Lease(storage, key, "writer", blocking=False, holder="a test", ttl=0.9).release()
    assert storage.put_if(f"{key}/plain", b"x", absent=True) is not None  # the write's own ETag comes back


def test_incremental_checkpoints_share_objects_and_retention_sweeps_them(s3_bucket: str) -> None:
    url = f"{s3_bucket}/ckpts"
    frozen = torch.randn(256, 256)  # 256 KiB, unchanged between steps: stored once, by content
    with torchkeep.CheckpointManager(url, incremental=True, keep_last=2) as manager:
        for step in range(1, 5):
            big = frozen if step > 1 else torch.randn(256, 256)  # step 1's own object goes with step 1
            manager.save(step, model={"frozen": big, "head": torch.full((4,), float(step))})
    storage, key = resolve(url)
    assert len(storage.list(f"{key}/objects")) == 1  # the shared one; step 1's was swept when step 1 went
    restored = {"frozen": torch.zeros(256, 256), "head": torch.zeros(4)}
    record = torchkeep.CheckpointManager(url).restore(model=restored)
    assert record.step == 4 and torch.equal(restored["frozen"], frozen) and float(restored["head"][0]) == 4.0


def test_a_large_shard_goes_up_in_parts_each_retried_on_its_own(s3_bucket: str, proxy: Proxy) -> None:
    storage = through(proxy, s3_bucket, client_retries=False)
    big = torch.randn(24 << 20)  # 96 MiB: over the single-PUT size, so three or four 32 MiB parts
    proxy.seen.clear()
    proxy.fail(2, "503", method="PUT")
    torchkeep.save({"big": big}, "ckpt", storage=storage)
    parts = [s for s in proxy.seen if s.method == "PUT" and "partNumber=" in s.path]
    assert sum(s.status == 503 for s in parts) == 2 and sum(s.status == 200 for s in parts) == 4
    assert sum(s.method == "POST" and "uploadId=" in s.path for s in proxy.seen) == 1  # one completion
    assert torch.equal(torchkeep.load("ckpt", storage=storage)["big"], big)


def test_the_shards_of_one_save_go_up_several_at_once(s3_bucket: str, proxy: Proxy) -> None:
    storage = through(proxy, s3_bucket)
    tensors = {f"t{i}": torch.full((64 << 10,), float(i)) for i in range(6)}  # 256 KiB each, one per shard
    proxy.put_delay = 0.3  # one after another, no two PUTs would ever be held at the same time
    torchkeep.save(tensors, "ckpt", storage=storage, max_shard_size=256 << 10)
    proxy.put_delay = 0.0
    assert 2 <= proxy.most_puts_at_once <= objectstore._PARALLEL_PUTS + 1  # the marker is sent after, alone
    assert sum(s.method == "PUT" and "/.tk-data/" in s.path for s in proxy.seen) == 7  # 6 shards + the manifest
    assert_same(torchkeep.load("ckpt", storage=storage), tensors)


def test_a_failed_shard_upload_publishes_nothing(s3_bucket: str, proxy: Proxy) -> None:
    storage = through(proxy, s3_bucket, client_retries=False)
    torchkeep.save(state(1), "ckpt", storage=storage)
    tensors = {f"t{i}": torch.full((64 << 10,), float(i)) for i in range(6)}
    proxy.fail(100, "503", method="PUT")  # past every retry
    with pytest.raises(torchkeep.StorageError):
        torchkeep.save(tensors, "ckpt", storage=storage, max_shard_size=256 << 10)
    proxy.clear_failures()
    assert_same(torchkeep.load("ckpt", storage=storage), state(1))  # the previous generation, whole
    generations = {p.split("/")[-2] for p in storage.fs.find(storage.root) if "/.tk-data/" in p}
    assert len(generations) == 1  # the failed save's objects were removed with it
