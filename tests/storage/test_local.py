"""LocalStorage: staging clean-up, replacement without exchange, and I/O failures."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from typing import Any

import pytest
import torch

import torchkeep
from tests.conftest import assert_same
from torchkeep.storage import local


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def age(path: Any, seconds: float) -> None:
    """Backdate every file under ``path`` (and itself) by ``seconds``."""
    when = time.time() - seconds
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (when, when))
    os.utime(path, (when, when))


def test_lockless_staging_of_dead_writers_is_removed_once_old_and_live_kept(tmp_path: Any) -> None:
    # Staging without an owner lock file (left by a torchkeep from before owner locks).
    stale = tmp_path / f".ckpt.tk-staging-{dead_pid()}-abcd1234"
    stale.mkdir()
    (stale / "data-00000.safetensors").write_bytes(b"partial")
    stale_other = tmp_path / f".other.tk-trash-{dead_pid()}-abcd1234"
    stale_other.mkdir()
    recent = tmp_path / f".ckpt.tk-staging-{dead_pid()}-0000beef"  # dead pid here, but fresh
    recent.mkdir()
    live = tmp_path / f".ckpt.tk-staging-{os.getppid()}-abcd1234"
    live.mkdir()
    for path in (stale, stale_other, live):
        age(path, local.STALE_AFTER_S + 60)
    assert os.listdir(tmp_path) and local.LocalStorage(tmp_path).list() == []
    torchkeep.save({"x": torch.ones(1)}, tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt", live.name, recent.name])


def test_replacement_without_atomic_exchange(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(local, "_exchange", lambda a, b: False)
    torchkeep.save({"x": torch.ones(1)}, tmp_path / "ckpt")
    torchkeep.save({"x": torch.zeros(1)}, tmp_path / "ckpt")
    assert_same({"x": torch.zeros(1)}, torchkeep.load(tmp_path / "ckpt"))
    assert os.listdir(tmp_path) == ["ckpt"]


def test_entry_moved_aside_by_a_dead_writer_is_put_back(tmp_path: Any) -> None:
    torchkeep.save({"x": torch.ones(1)}, tmp_path / "ckpt")
    os.rename(tmp_path / "ckpt", tmp_path / f".ckpt.tk-old-{dead_pid()}-00000000")
    assert_same({"x": torch.ones(1)}, torchkeep.load(tmp_path / "ckpt"))
    assert os.listdir(tmp_path) == ["ckpt"]


def test_disk_full_is_a_typed_error_and_leaves_the_old_checkpoint(tmp_path: Any, monkeypatch: Any) -> None:
    torchkeep.save({"x": torch.ones(4)}, tmp_path / "ckpt")

    def failing_fsync(fd: int) -> None:  # the disk reports it is full when data is flushed
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(torchkeep.StorageError, match="disk is full") as err:
        torchkeep.save({"x": torch.zeros(4096)}, tmp_path / "ckpt")
    assert isinstance(err.value, OSError)
    assert str(tmp_path) in str(err.value)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt"]
    assert_same({"x": torch.ones(4)}, torchkeep.load(tmp_path / "ckpt"))


def test_unsupported_value_deep_in_the_tree_leaves_nothing(tmp_path: Any) -> None:
    class Exploding:
        def __reduce__(self) -> Any:  # never reached: refused before any write
            raise AssertionError

    with pytest.raises(torchkeep.UnsupportedObjectError):
        torchkeep.save({"a": torch.ones(2), "b": Exploding()}, tmp_path / "ckpt")
    assert os.listdir(tmp_path) == []


def test_refuses_to_replace_data_that_is_not_a_checkpoint(tmp_path: Any) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "paper.txt").write_text("precious")
    with pytest.raises(torchkeep.CheckpointExistsError) as err:
        torchkeep.save({"x": 1}, tmp_path / "notes")
    assert isinstance(err.value, FileExistsError)
    (tmp_path / "file").write_text("precious")
    with pytest.raises(torchkeep.CheckpointExistsError):
        torchkeep.save({"x": 1}, tmp_path / "file")
    (tmp_path / "dir.pth").mkdir()
    with pytest.raises(torchkeep.CheckpointExistsError):
        torchkeep.save({"x": 1}, tmp_path / "dir.pth")
    assert (tmp_path / "notes" / "paper.txt").read_text() == "precious"
    assert (tmp_path / "file").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    torchkeep.save({"x": 1}, tmp_path / "empty")
    assert torchkeep.load(tmp_path / "empty") == {"x": 1}


def test_unknown_scheme_lists_known_ones() -> None:
    with pytest.raises(torchkeep.InvalidArgumentError, match="file://, memory://"):
        torchkeep.load("s4://bucket/ckpt")
