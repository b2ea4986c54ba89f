"""Hostile storage: other PID namespaces, planted links and pipes, read-only and full disks, entries swapped.

Each test names in its docstring the guard it checks; with that guard taken
out of ``torchkeep/storage/local.py``, ``torchkeep/locking.py`` or the CLI's
``plot``, the test fails (it does not hang: anything that could block runs in a
subprocess or thread with a timeout, and a subprocess that could read a device
forever runs under a memory limit).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from tests.conftest import assert_same
from torchkeep.storage import LocalStorage, local

ROOT = Path(__file__).resolve().parents[1]


def state(v: float) -> dict[str, Any]:
    return {"w": torch.full((64, 32), float(v)), "b": torch.full((7,), float(v)), "version": v}


def run_py(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


def backdate(path: Path, seconds: float) -> None:
    when = time.time() - seconds
    os.utime(path, (when, when), follow_symlinks=False)


# -- 1. Ownership of staging is an flock, not a PID ------------------------------------------------

# A save in another PID namespace (another container on the volume, another NFS host): every PID
# of ours is dead or someone else there, which is what it sees when _pid_alive says False.
OTHER_NAMESPACE_SAVE = """
    import sys, torch, torchkeep
    from torchkeep.storage import LocalStorage, local
    local._pid_alive = lambda pid: False
    torchkeep.save({"y": torch.ones(3)}, sys.argv[1])
    print(LocalStorage(sys.argv[2]).exists(sys.argv[3]))
"""


def test_save_from_another_pid_namespace_leaves_a_live_writers_staging(tmp_path: Path, monkeypatch: Any) -> None:
    """Guard: a cleaner removes staging only when it can take the owner's flock (``_claim``), not by PID."""
    path = tmp_path / "ckpt"
    torchkeep.save(state(0), path)
    real_open = local._LocalTransaction.open
    checked: list[str] = []

    def open_then_clean(self: Any, name: str = "") -> Any:
        f = real_open(self, name)
        if not checked:
            checked.append(self._staging)
            result = run_py(OTHER_NAMESPACE_SAVE, str(tmp_path / "other"), str(tmp_path), "ckpt")
            assert result.returncode == 0, result.stderr
            assert os.path.isdir(self._staging), "the other namespace's save removed a live writer's staging"
        return f

    monkeypatch.setattr(local._LocalTransaction, "open", open_then_clean)
    torchkeep.save(state(1), path, max_shard_size=1024)  # several shards: the first written before the clean
    monkeypatch.undo()
    assert checked
    torchkeep.verify(path)
    assert_same(state(1), torchkeep.load(path))
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "other"]


def _make_entry(tmp_path: Path, kind: str, token: str) -> Path:
    """A hidden entry of ``kind`` for owner ``token`` beside ``ckpt`` (an old entry: the moved-aside checkpoint)."""
    marker = {"staging": local._STAGING, "trash": local._TRASH, "old": local._OLD}[kind]
    entry = tmp_path / f".ckpt{marker}{token}"
    if kind == "old":
        torchkeep.save(state(0), tmp_path / "ckpt")
        os.rename(tmp_path / "ckpt", entry)
    else:
        entry.mkdir()
        (entry / "data-00000.safetensors").write_bytes(b"written so far")
    return entry


@pytest.mark.parametrize("kind", ["staging", "trash", "old"])
def test_entries_of_a_live_owner_survive_cleaners_of_other_namespaces(tmp_path: Path, kind: str) -> None:
    """Guard: ``_claim`` returns None while the owner's lock is held (``BlockingIOError``), whatever its PID."""
    owner = local._OwnerLock(str(tmp_path), "ckpt")
    try:
        entry = _make_entry(tmp_path, kind, owner.token)
        result = run_py(OTHER_NAMESPACE_SAVE, str(tmp_path / "other"), str(tmp_path), "ckpt")
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["False"]  # an old entry of a live owner is not put back either
        assert entry.is_dir()
        assert not (tmp_path / "ckpt").exists()
    finally:
        owner.release()


DIE_HOLDING = """
    import os, signal, sys, torch, torchkeep
    from torchkeep.storage import local
    directory, kind = sys.argv[1], sys.argv[2]
    owner = local._OwnerLock(directory, "ckpt")
    marker = {"staging": local._STAGING, "trash": local._TRASH, "old": local._OLD}[kind]
    entry = os.path.join(directory, ".ckpt" + marker + owner.token)
    if kind == "old":
        torchkeep.save({"version": 0}, os.path.join(directory, "ckpt"))
        os.rename(os.path.join(directory, "ckpt"), entry)
    else:
        os.mkdir(entry)
        open(os.path.join(entry, "data-00000.safetensors"), "wb").close()
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("kind", ["staging", "trash", "old"])
def test_entries_of_a_dead_owner_are_cleaned_at_once(tmp_path: Path, kind: str) -> None:
    """Guard: a lock taken at once from an owner on this kernel means it is dead (``locked and same_kernel``)."""
    result = run_py(DIE_HOLDING, str(tmp_path), kind)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert len(os.listdir(tmp_path)) == 2  # the entry and its lock file
    torchkeep.save({"y": 1}, tmp_path / "other")
    expected = ["ckpt", "other"] if kind == "old" else ["other"]
    assert sorted(os.listdir(tmp_path)) == expected
    if kind == "old":
        assert torchkeep.load(tmp_path / "ckpt") == {"version": 0}


def test_owner_on_another_kernel_is_kept_until_its_lock_file_is_quiet(tmp_path: Path) -> None:
    """Guard: the kernel id in the lock file and ``STALE_AFTER_S`` (NFS clients whose locks may be local)."""
    token = "4242-0badcafe"
    lock = tmp_path / f".ckpt{local._LOCK}{token}"
    lock.write_text("4242 0000-another-kernel other-host\n")  # nobody here holds its flock
    staging = _make_entry(tmp_path, "staging", token)
    torchkeep.save({"y": 1}, tmp_path / "other")
    assert staging.is_dir() and lock.exists()  # a writer on another host may still be writing
    backdate(lock, local.STALE_AFTER_S + 60)
    torchkeep.save({"y": 2}, tmp_path / "other")
    assert sorted(os.listdir(tmp_path)) == ["other"]


def _vanish(how: str, staging: str) -> None:
    if how == "removed":
        shutil.rmtree(staging)
    elif how == "replaced":  # a new, empty entry appears at the staging's name
        os.rename(staging, staging + "-elsewhere")
        os.mkdir(staging)
    elif how == "emptied":  # a cleaner removed the files but not (yet) the folder
        for name in os.listdir(staging):
            os.remove(os.path.join(staging, name))


@pytest.mark.parametrize(
    ("how", "when", "message"),
    [
        ("removed", "open", "was removed while"),  # guard: open() checks the staging and creates through its fd
        ("replaced", "commit", "was replaced by another entry"),  # guard: commit compares the staging's inode
        ("emptied", "commit", "lost its object"),  # guard: commit checks every object written is still there
    ],
)
def test_writer_whose_staging_vanished_fails_and_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: Any, how: str, when: str, message: str
) -> None:
    """Guards: ``_LocalTransaction._check_staging`` and the creation of objects through the staging's fd."""
    path = tmp_path / "ckpt"
    torchkeep.save(state(0), path)
    if when == "open":
        real_open = local._LocalTransaction.open
        calls: list[str] = []

        def open_after_vanish(self: Any, name: str = "") -> Any:
            if calls:
                _vanish(how, self._staging)
            calls.append(name)
            return real_open(self, name)

        monkeypatch.setattr(local._LocalTransaction, "open", open_after_vanish)
    else:
        real_commit = local._LocalTransaction.commit

        def commit_after_vanish(self: Any) -> None:
            _vanish(how, self._staging)
            real_commit(self)

        monkeypatch.setattr(local._LocalTransaction, "commit", commit_after_vanish)
    with pytest.raises(torchkeep.StorageError, match=message) as err:
        torchkeep.save(state(1), path)
    assert "unchanged" in str(err.value)
    monkeypatch.undo()
    torchkeep.verify(path)
    assert_same(state(0), torchkeep.load(path))


# -- 2. Nothing is written through a planted link, pipe or hard link -------------------------------


def plant(place: Path, kind: str, victim: Path) -> None:
    if kind == "symlink":
        place.symlink_to(victim)
    elif kind == "hardlink":
        os.link(victim, place)
    else:
        os.mkfifo(place)


def in_thread(fn: Callable[[], Any], timeout: float = 60) -> Any:
    """``fn()`` in a thread; fails (instead of hanging the suite) if it does not return in time."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{fn} still blocked after {timeout} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text("precious")
    return path


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo"])
def test_planted_manager_lock_file_is_refused(tmp_path: Path, victim: Path, kind: str) -> None:
    """Guard: ``locking._open_lock_file`` (O_NOFOLLOW, regular file with one link, checked before and after open)."""
    run = tmp_path / "run"
    run.mkdir()
    plant(run / ".torchkeep.lock", kind, victim)
    model = nn.Linear(2, 2)

    def save() -> None:
        with torchkeep.CheckpointManager(run) as mgr:
            mgr.save(1, model=model)

    with pytest.raises(torchkeep.StorageError, match="never writes through") as err:
        in_thread(save)
    assert str(run / ".torchkeep.lock") in str(err.value)
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_planted_registry_lock_file_is_refused(tmp_path: Path, victim: Path, kind: str) -> None:
    """Guard: ``locking._open_lock_file``, through the registry's lock."""
    root = tmp_path / "registry"
    root.mkdir()
    plant(root / ".registry.lock", kind, victim)
    with pytest.raises(torchkeep.StorageError) as err:
        in_thread(lambda: torchkeep.Registry(root).register("m", {"w": torch.ones(2)}))
    assert ".registry.lock" in str(err.value)
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("directory", [True, False])
def test_link_planted_inside_the_staging_is_not_written_through(
    tmp_path: Path, victim: Path, monkeypatch: Any, directory: bool
) -> None:
    """Guard: staging objects are created with O_CREAT|O_EXCL|O_NOFOLLOW."""
    real_open = local._LocalTransaction.open

    def open_after_plant(self: Any, name: str = "") -> Any:
        place = os.path.join(self._staging, name) if name else self._staging
        if not os.path.lexists(place):
            os.symlink(victim, place)
        return real_open(self, name)

    monkeypatch.setattr(local._LocalTransaction, "open", open_after_plant)
    path = tmp_path / ("ckpt" if directory else "x.safetensors")
    with pytest.raises(torchkeep.StorageError, match="never writes through an existing name"):
        torchkeep.save({"w": torch.ones(4)}, path)
    assert victim.read_text() == "precious"
    assert not path.exists()


@pytest.fixture
def run_with_metrics(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    with torchkeep.CheckpointManager(run) as mgr:
        for step in (1, 2):
            mgr.save(step, metrics={"loss": 1.0 / step}, w=torch.ones(2))
    return run


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo"])
def test_plot_replaces_a_planted_file_instead_of_writing_through_it(
    run_with_metrics: Path, victim: Path, kind: str
) -> None:
    """Guard: ``plot`` writes a new file beside the target and renames it over the target."""
    pytest.importorskip("matplotlib")  # the cli extra's plot dependency: installed in the dev environment
    from torchkeep.cli import main

    target = run_with_metrics / "metrics.png"
    plant(target, kind, victim)
    assert in_thread(lambda: main(["plot", str(run_with_metrics)])) == 0
    assert victim.read_text() == "precious"
    assert not target.is_symlink() and target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p for p in os.listdir(run_with_metrics) if ".tk-plot-" in p] == []


# -- 3. A pipe or device where a file is expected -------------------------------------------------

# Runs reader calls under a memory limit (a device read to the end would take all memory) and prints
# what each raised; the parent kills it if it blocks.
READER = """
    import json, resource, sys, warnings
    resource.setrlimit(resource.RLIMIT_DATA, (4 << 30, 4 << 30))
    import torch, torchkeep
    path, results = sys.argv[1], []
    for op in sys.argv[2:]:
        out = {"op": op}
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if op == "restore":
                    model = torch.nn.Linear(2, 1, bias=False)
                    record = torchkeep.CheckpointManager(path).restore(model=model)
                    out["value"] = None if record is None else record.step
                    out["w"] = model.weight.flatten().tolist()
                else:
                    getattr(torchkeep, op)(path)
                    out["value"] = None
            out["warnings"] = [str(w.message) for w in caught]
        except BaseException as exc:
            out["error"] = type(exc).__name__
            out["typed"] = isinstance(exc, torchkeep.TorchkeepError)
            out["message"] = str(exc)
        results.append(out)
    print(json.dumps(results))
"""


def filled(value: float) -> nn.Linear:
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def read_in_child(path: Path, *ops: str) -> list[dict[str, Any]]:
    try:
        result = run_py(READER, str(path), *ops, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"one of {ops} on {str(path)!r} blocked for 90 s")
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout.strip().splitlines()[-1]))


def _replace_with(place: Path, what: str) -> None:
    if place.is_dir():
        shutil.rmtree(place)
    elif place.exists() or place.is_symlink():
        place.unlink()
    if what == "fifo":
        os.mkfifo(place)
    else:
        place.symlink_to(what)


def _native(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    torchkeep.save(state(0), path)
    return path


def _hf_sharded(tmp_path: Path) -> Path:
    folder = tmp_path / "hf"
    folder.mkdir()
    torchkeep.save({"w": torch.ones(4)}, folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"w": "model-00001-of-00001.safetensors"}})
    )
    return folder


# (case, the checkpoint to make, the file in it to replace, what to put there, what the error names).
# Every case is refused by LocalStorage._open_regular; two are also refused by an earlier layer, which
# then speaks first: the native opener's shard size check (shard-fifo) and the pickle scan's own
# regular-file check (pth-dev-zero).
CASES = [
    ("manifest-fifo", _native, "manifest.json", "fifo", "named pipe"),
    ("shard-fifo", _native, "data-00000.safetensors", "fifo", "data-00000.safetensors"),
    ("safetensors-fifo", None, "x.safetensors", "fifo", "named pipe"),
    ("safetensors-dev-zero", None, "x.safetensors", "/dev/zero", "character device"),
    ("pth-dev-zero", None, "x.pth", "/dev/zero", "character device"),
    ("hf-index-fifo", _hf_sharded, "model.safetensors.index.json", "fifo", "named pipe"),
    ("hf-index-dev-zero", _hf_sharded, "model.safetensors.index.json", "/dev/zero", "character device"),
]


@pytest.mark.parametrize(("case", "make", "name", "what", "names"), CASES, ids=[c[0] for c in CASES])
def test_pipe_or_device_in_place_of_a_file_is_a_prompt_typed_error(
    tmp_path: Path, case: str, make: Any, name: str, what: str, names: str
) -> None:
    """Guard: ``LocalStorage._open_regular`` (stat, O_NONBLOCK open, fstat: regular files only; bounded reads)."""
    checkpoint = make(tmp_path) if make is not None else tmp_path / name
    place = checkpoint / name if make is not None else checkpoint
    _replace_with(place, what)
    outs = read_in_child(checkpoint, "load", "inspect", "verify")
    assert [out["op"] for out in outs] == ["load", "inspect", "verify"]
    for out in outs:
        assert out.get("typed"), out
        assert out["error"] == "CorruptCheckpointError", out
        assert names in out["message"], out


def test_restore_skips_a_step_whose_manifest_is_a_pipe(tmp_path: Path) -> None:
    """Guard: ``LocalStorage._open_regular``: the manifest read fails at once, so the run directory skips the step."""
    run = tmp_path / "run"
    with torchkeep.CheckpointManager(run) as mgr:
        for step in (1, 2):
            mgr.save(step, model=filled(step))
    _replace_with(run / "step-00000002" / "manifest.json", "fifo")
    (out,) = read_in_child(run, "restore")
    assert "error" not in out, out
    assert out["value"] == 1 and out["w"] == [1.0, 1.0]
    assert any("step-00000002" in w and "named pipe" in w for w in out["warnings"]), out


def test_storage_reads_are_bounded_by_the_file_size(tmp_path: Path) -> None:
    """Guard: ``read`` with no length reads at most the size fstat gave when it opened the file."""
    (tmp_path / "f").write_bytes(b"0123456789")
    storage = LocalStorage(tmp_path)
    assert storage.read("f") == b"0123456789"
    assert storage.read("f", 4) == b"456789"
    assert storage.read("f", 4, 3) == b"456"
    assert storage.read("f", 20) == b""
    os.mkfifo(tmp_path / "p")
    for call in (
        lambda: storage.read("p"),
        lambda: storage.read("p", 0, 16),
        lambda: storage.read_into("p", 0, memoryview(bytearray(4))),
        lambda: storage.map("p"),
    ):
        with pytest.raises(torchkeep.CorruptCheckpointError, match="named pipe") as err:
            in_thread(call, timeout=30)
        assert err.value.path == str(tmp_path / "p")


# -- 4. Read-only folders and full disks ----------------------------------------------------------

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC


@pytest.fixture
def broken_disk(tmp_path: Path, monkeypatch: Any) -> Iterator[Callable[[int], None]]:
    """``break_(code)``: from now on every write under tmp_path fails with ``code`` (EROFS or ENOSPC).

    Runs as root, so permissions cannot make a folder read-only: the ``os`` calls fail instead, as a
    read-only mount or a disk without free inodes makes them fail (an existing folder still says EEXIST).
    """
    root = str(tmp_path)

    def under(path: Any, dir_fd: int | None) -> bool:
        return dir_fd is not None or os.path.abspath(os.fsdecode(path)).startswith(root)

    def break_(code: int) -> None:
        real_open, real_mkdir = os.open, os.mkdir

        def fail(path: Any) -> OSError:
            return OSError(code, os.strerror(code), os.fsdecode(path))

        def fake_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
            if under(path, dir_fd) and flags & _WRITE_FLAGS:
                exists = os.path.lexists(path) if dir_fd is None else False
                if code == errno.EROFS or not exists:
                    raise fail(path)
            return real_open(path, flags, mode, dir_fd=dir_fd)

        def fake_mkdir(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
            if under(path, dir_fd):
                if dir_fd is None and os.path.lexists(path):
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(path))
                raise fail(path)
            real_mkdir(path, mode, dir_fd=dir_fd)

        monkeypatch.setattr(os, "open", fake_open)
        monkeypatch.setattr(os, "mkdir", fake_mkdir)
        if code == errno.EROFS:
            for name in ("rename", "replace"):
                real = getattr(os, name)

                def fake_move(a: Any, b: Any, *, _real: Any = real, **kw: Any) -> None:
                    if under(a, None):
                        raise fail(a)
                    _real(a, b, **kw)

                monkeypatch.setattr(os, name, fake_move)
            for name in ("remove", "unlink", "rmdir"):
                real = getattr(os, name)

                def fake_remove(a: Any, *, _real: Any = real, **kw: Any) -> None:
                    if under(a, kw.get("dir_fd")):
                        raise fail(a)
                    _real(a, **kw)

                monkeypatch.setattr(os, name, fake_remove)

    yield break_
    monkeypatch.undo()


FULL_OR_READ_ONLY = [(errno.EROFS, "the filesystem is read-only"), (errno.ENOSPC, "no free inodes")]


@pytest.mark.parametrize(("code", "says"), FULL_OR_READ_ONLY, ids=["read-only", "no-inodes"])
def test_manager_save_on_a_broken_disk_is_a_storage_error(
    tmp_path: Path, broken_disk: Callable[[int], None], code: int, says: str
) -> None:
    """Guard: FolderLock wraps the OSError of opening ``.torchkeep.lock`` (read-only), ``_OwnerLock`` (no inodes)."""
    run = tmp_path / "run"
    with torchkeep.CheckpointManager(run) as mgr:
        mgr.save(1, model=filled(1))
    broken_disk(code)
    mgr = torchkeep.CheckpointManager(run)
    with pytest.raises(torchkeep.StorageError, match=says) as err:
        mgr.save(2, model=filled(2))
    assert str(run) in str(err.value)
    if code == errno.EROFS:
        assert "Reading needs no lock" in str(err.value)
        model = filled(0)  # reading takes no lock and works on the read-only folder
        record = torchkeep.CheckpointManager(run).restore(model=model)
        assert record is not None and record.step == 1
        assert torch.equal(model.weight, torch.ones(1, 2))


@pytest.mark.parametrize(("code", "says"), FULL_OR_READ_ONLY, ids=["read-only", "no-inodes"])
def test_save_on_a_broken_disk_is_a_storage_error(
    tmp_path: Path, broken_disk: Callable[[int], None], code: int, says: str
) -> None:
    """Guard: ``_OwnerLock`` and ``_LocalTransaction`` wrap every OSError (lock file, staging) in StorageError."""
    path = tmp_path / "ckpt"
    torchkeep.save(state(0), path)
    broken_disk(code)
    for target in (path, tmp_path / "new", tmp_path / "x.safetensors"):
        with pytest.raises(torchkeep.StorageError, match=says) as err:
            torchkeep.save(state(1), target)
        assert str(tmp_path) in str(err.value)
    assert_same(state(0), torchkeep.load(path))


def test_delete_on_a_read_only_disk_is_a_storage_error(tmp_path: Path, broken_disk: Callable[[int], None]) -> None:
    """Guard: ``LocalStorage.delete`` wraps the OSError of its lock file and rename in StorageError."""
    torchkeep.save(state(0), tmp_path / "ckpt")
    torchkeep.save({"w": torch.ones(1)}, tmp_path / "x.safetensors")
    broken_disk(errno.EROFS)
    storage = LocalStorage(tmp_path)
    for key in ("ckpt", "x.safetensors"):
        with pytest.raises(torchkeep.StorageError, match="read-only"):
            storage.delete(key)
    assert_same(state(0), torchkeep.load(tmp_path / "ckpt"))


@pytest.mark.parametrize(("code", "says"), FULL_OR_READ_ONLY, ids=["read-only", "no-inodes"])
def test_register_on_a_broken_disk_is_a_storage_error(
    tmp_path: Path, broken_disk: Callable[[int], None], code: int, says: str
) -> None:
    """Guard: FolderLock wraps the OSError of the ``.registry.lock`` open (read-only), ``_OwnerLock`` (no inodes)."""
    root = tmp_path / "registry"
    registry = torchkeep.Registry(root)
    registry.register("m", {"w": torch.ones(2)})
    broken_disk(code)
    with pytest.raises(torchkeep.StorageError, match=says) as err:
        torchkeep.Registry(root).register("m", {"w": torch.zeros(2)})
    assert str(root) in str(err.value)
    if code == errno.EROFS:
        assert ".registry.lock" in str(err.value)


# -- 5. Entries replaced or deleted under a reader ------------------------------------------------


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("name", ["ckpt", "x.safetensors"])
def test_identity_changes_when_an_entry_is_saved_again_or_deleted(
    tmp_path: Path, monkeypatch: Any, exchange: bool, name: str
) -> None:
    """Guard: ``LocalStorage.identity`` (device, inode and ctime of the entry)."""
    if not exchange:
        monkeypatch.setattr(local, "_exchange", lambda a, b: False)
    storage = LocalStorage(tmp_path)
    seen = set()
    for v in range(4):  # inodes freed by one save may be reused by a later one: the ctime tells them apart
        torchkeep.save({"w": torch.full((4,), float(v))}, tmp_path / name)
        first = storage.identity(name)
        assert storage.identity(name) == first  # stable while nothing changes
        assert first not in seen
        seen.add(first)
    storage.delete(name)
    with pytest.raises(torchkeep.CheckpointNotFoundError, match=name):
        storage.identity(name)


def test_checkpoint_deleted_under_a_reader_is_not_found(tmp_path: Path, monkeypatch: Any) -> None:
    """Guard: ``LocalStorage._translate`` turns ENOENT, ENOTDIR and ESTALE into CheckpointNotFoundError."""
    torchkeep.save(state(0), tmp_path / "ckpt")
    storage = LocalStorage(tmp_path)
    shard = "ckpt/data-00000.safetensors"
    storage.delete("ckpt")
    calls: list[Callable[[], Any]] = [
        lambda: storage.size(shard),
        lambda: storage.read(shard),
        lambda: storage.read_into(shard, 0, memoryview(bytearray(8))),
        lambda: storage.map(shard),
        lambda: storage.identity("ckpt"),
    ]
    for call in calls:
        with pytest.raises(torchkeep.CheckpointNotFoundError):
            call()
    torchkeep.save(state(0), tmp_path / "ckpt")
    real_open = os.open

    def stale(path: Any, flags: int, *args: Any, **kw: Any) -> int:  # an NFS file deleted on the server
        if "data-00000" in os.fsdecode(path):
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), path)
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", stale)
    for call in calls[1:4]:
        with pytest.raises(torchkeep.CheckpointNotFoundError, match="deleted while being read"):
            call()


def test_no_warning_and_nothing_left_after_ordinary_saves(tmp_path: Path) -> None:
    """Guard: the owner lock file is removed when a transaction or a delete ends."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torchkeep.CheckpointManager(tmp_path / "run", keep_last=1) as mgr:
            for step in range(3):
                mgr.save(step, model=filled(step))
        torchkeep.save({"w": torch.ones(1)}, tmp_path / "x.safetensors")
        torchkeep.save({"w": torch.ones(1)}, tmp_path / "x.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["run", "x.safetensors"]
    assert sorted(os.listdir(tmp_path / "run")) == [".torchkeep.lock", "step-00000002"]
