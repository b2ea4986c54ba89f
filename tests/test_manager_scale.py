"""A manager directory of 1,000 checkpoints: listed right, retention right, a save that reads none of them.

The directories are built in well under a second: ten checkpoints are saved
through a manager, then copied under the other step names (a record's step is
its folder's name; the copies keep their template's metrics).
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep
from torchkeep.cli import main
from torchkeep.run_directory import step_name
from torchkeep.storage import LocalStorage, MemoryStorage, Storage, join_key

STATE: dict[str, Any] = {"state": {"w": torch.arange(4.0)}}
TEMPLATES = 10


def loss_of(step: int) -> float:
    """The loss of step's template: ten distinct values, the best (0.0) at steps 1, 11, 21, ..."""
    return ((step - 1) % TEMPLATES * 3 % TEMPLATES) / 10


class Counting:
    """A storage that counts the calls made to it, by method and by the key's last two parts."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.calls: Counter[tuple[str, str]] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            key = args[0] if args and isinstance(args[0], str) else ""
            self.calls[name, "/".join(key.split("/")[-2:])] += 1
            return attr(*args, **kwargs)

        return counted

    def count(self, method: str, ending: str = "") -> int:
        return sum(n for (m, key), n in self.calls.items() if m == method and key.endswith(ending))

    def manifest_reads(self, *, besides: tuple[int, ...] = ()) -> int:
        """Manifests read, other than those of ``besides`` (a save reads its own checkpoint back)."""
        mine = {f"{step_name(step)}/manifest.json" for step in besides}
        return sum(
            n for (m, key), n in self.calls.items() if m == "read" and key.endswith("manifest.json") and key not in mine
        )


def fill(storage: Storage, prefix: str, count: int) -> None:
    """Commit checkpoints of steps 1..count into ``prefix``."""
    with torchkeep.CheckpointManager(prefix, storage=storage, rng=False) as mgr:
        for step in range(1, min(count, TEMPLATES) + 1):
            mgr.save(step, metrics={"loss": loss_of(step)}, **STATE)
    for step in range(TEMPLATES + 1, count + 1):
        source = join_key(prefix, step_name((step - 1) % TEMPLATES + 1))
        target = join_key(prefix, step_name(step))
        local, copy = storage.local_path(source), storage.local_path(target)
        if local is not None and copy is not None:
            shutil.copytree(local, copy)
            continue
        with storage.begin(target, directory=True) as txn:
            for name in storage.list(source):
                with txn.open(name) as f:
                    f.write(storage.read(join_key(source, name)))


Backend = Callable[[Path], Storage]
BACKENDS: dict[str, Backend] = {"local": lambda tmp: LocalStorage(tmp), "memory": lambda tmp: MemoryStorage()}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: Any) -> Backend:
    return BACKENDS[request.param]


def test_a_fresh_manager_lists_1000_checkpoints_reading_each_manifest_once(tmp_path: Path, backend: Backend) -> None:
    inner = backend(tmp_path)
    fill(inner, "run", 1000)
    storage = Counting(inner)
    mgr = torchkeep.CheckpointManager("run", storage=storage)
    records = mgr.list()
    assert [r.step for r in records] == list(range(1, 1001))
    assert all(r.metrics == {"loss": loss_of(r.step)} for r in records)
    assert records[499].path == inner.describe("run/step-00000500")
    assert len({r.size for r in records}) == 1 and records[0].size > 0
    assert storage.manifest_reads() == 1000
    storage.calls.clear()
    assert mgr.list() == records  # a reader's second look: one listing, and no manifest read again
    assert storage.manifest_reads() == 0 and storage.count("list") == 1


def saves_calls(storage: Counting, mgr: torchkeep.CheckpointManager, steps: range) -> Counter[str]:
    """The storage calls, by method, of saving ``steps``, each with loss 0.5."""
    storage.calls.clear()
    for step in steps:
        mgr.save(step, metrics={"loss": 0.5}, **STATE)
    assert storage.manifest_reads(besides=tuple(steps)) == 0
    by_method: Counter[str] = Counter()
    for (method, _), n in storage.calls.items():
        by_method[method] += n
    return by_method


def test_a_save_into_1000_checkpoints_makes_the_storage_calls_of_a_save_into_3(
    tmp_path: Path, backend: Backend
) -> None:
    calls = {}
    for count in (3, 1000):
        inner = backend(tmp_path / str(count))
        fill(inner, "run", count)
        storage = Counting(inner)
        with torchkeep.CheckpointManager("run", storage=storage, keep_every=1, rng=False) as mgr:
            mgr.save(count + 1, **STATE)  # the first save after taking the lock checks what it knew
            calls[count] = saves_calls(storage, mgr, range(count + 2, count + 5))
            assert storage.calls["list", "run"] == 0  # nothing to delete: the directory is not even listed
            assert [r.step for r in mgr.list()] == list(range(1, count + 5))
    assert calls[1000] == calls[3]


def test_retention_over_1000_checkpoints(tmp_path: Path, backend: Backend) -> None:
    inner = backend(tmp_path)
    fill(inner, "run", 1000)
    storage = Counting(inner)
    options: dict[str, Any] = {"keep_every": 100, "keep_last": 3, "keep_best": 1, "monitor": "loss", "rng": False}
    with torchkeep.CheckpointManager("run", storage=storage, **options) as mgr:
        mgr.save(1001, metrics={"loss": 0.5}, **STATE)
        best = 991  # the newest of the steps with loss 0.0
        assert [r.step for r in mgr.list()] == [*range(100, 1000, 100), best, 999, 1000, 1001]
        saved = saves_calls(storage, mgr, range(1002, 1004))  # each deletes one: it lists, reads nothing
        assert saved["list"] > 0
        kept = [*range(100, 1001, 100), best, 1001, 1002, 1003]
        assert [r.step for r in mgr.list()] == sorted(kept)
    fresh = torchkeep.CheckpointManager("run", storage=inner, **options)
    assert [r.step for r in fresh.list()] == sorted(kept)
    assert fresh.best() is not None and fresh.best().step == best  # type: ignore[union-attr]


def test_a_checkpoint_removed_behind_the_writers_back_is_not_counted_as_kept(tmp_path: Path) -> None:
    with torchkeep.CheckpointManager(tmp_path / "run", keep_last=3, rng=False) as mgr:
        for step in range(1, 11):
            mgr.save(step, **STATE)
        assert [r.step for r in mgr.list()] == [8, 9, 10]
        shutil.rmtree(tmp_path / "run" / step_name(9))  # rm -r, while the writer holds the lock
        mgr.save(11, **STATE)  # keep_last=3 of what is there: 8, 10, 11
        assert [r.step for r in mgr.list()] == [8, 10, 11]
        shutil.rmtree(tmp_path / "run" / step_name(11))
        assert [r.step for r in mgr.list()] == [8, 10]
        target: dict[str, Any] = {"state": {}}
        with pytest.raises(torchkeep.CheckpointNotFoundError):
            mgr.restore(11, **target)
        assert mgr.restore(**target).step == 10  # type: ignore[union-attr]
        mgr.save(12, **STATE)
        assert [r.step for r in mgr.list()] == [8, 10, 12]


def test_prune_and_a_resave_behind_a_readers_back(tmp_path: Path, capsys: Any) -> None:
    storage = LocalStorage(tmp_path)
    fill(storage, "run", 30)
    reader = torchkeep.CheckpointManager(tmp_path / "run", monitor="loss", rng=False)
    assert len(reader.list()) == 30
    assert main(["prune", str(tmp_path / "run"), "--keep-last", "2"]) == 0
    capsys.readouterr()
    assert [r.step for r in reader.list()] == [29, 30]
    target: dict[str, Any] = {"state": {}}
    with pytest.raises(torchkeep.CheckpointNotFoundError):
        reader.restore(5, **target)
    # Saved again with other metrics, in a manifest of the same size: the reader sees the new one.
    manifest = tmp_path / "run" / step_name(30) / "manifest.json"
    size = manifest.stat().st_size
    with torchkeep.CheckpointManager(tmp_path / "run", rng=False) as writer:
        writer.save(30, metrics={"loss": 0.9}, **STATE)
    assert manifest.stat().st_size == size and loss_of(30) != 0.9
    assert [r.metrics for r in reader.list()] == [{"loss": loss_of(29)}, {"loss": 0.9}]


def test_what_a_manager_knew_before_it_took_the_lock_is_checked_once(tmp_path: Path) -> None:
    with torchkeep.CheckpointManager(tmp_path / "run", rng=False) as first:
        first.save(1, metrics={"loss": 0.25}, **STATE)
        first.save(2, metrics={"loss": 0.5}, **STATE)
    mgr = torchkeep.CheckpointManager(tmp_path / "run", keep_best=1, monitor="loss", rng=False)
    assert mgr.best().step == 1  # type: ignore[union-attr]
    with torchkeep.CheckpointManager(tmp_path / "run", rng=False) as other:  # while mgr does not hold the lock
        other.save(1, metrics={"loss": 0.75}, **STATE)
    mgr.save(3, metrics={"loss": 0.5}, **STATE)  # keeps the best by what step 1 holds now: step 3
    assert [(r.step, r.metrics["loss"]) for r in mgr.list()] == [(3, 0.5)]
    mgr.close()


def test_a_step_under_a_second_name_is_listed_once_by_its_own_name(tmp_path: Path) -> None:
    with torchkeep.CheckpointManager(tmp_path / "run", rng=False) as mgr:
        for step in (4, 5):
            mgr.save(step, **STATE)
        shutil.copytree(tmp_path / "run" / step_name(5), tmp_path / "run" / "step-5")  # same step, another name
        for _ in range(2):
            mgr.save(6, **STATE)
            records = mgr.list()
            assert [r.step for r in records] == [4, 5, 6]
            assert records[1].path == str(tmp_path / "run" / step_name(5))
