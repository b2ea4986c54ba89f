"""Asynchronous saving: the snapshot is what is saved, failures surface, commits stay ordered."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep.storage.memory import MemoryStorage

ROOT = Path(__file__).resolve().parents[1]


def test_saved_values_are_those_at_the_call(tmp_path: Path) -> None:
    model = nn.Linear(256, 256)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torchkeep.CheckpointManager(tmp_path, async_save=True) as mgr:
        handle = mgr.save(1, model=model, extra={"note": "kept"})
        assert isinstance(handle, torchkeep.SaveHandle) and handle.step == 1
        with torch.no_grad():
            model.weight.add_(1.0)  # training goes on the moment save returns
            model.bias.zero_()
        record = handle.wait()
        assert record.step == 1 and handle.done()
    loaded = torchkeep.load(tmp_path / "step-00000001")
    assert torch.equal(loaded["model"]["weight"], before["weight"])
    assert torch.equal(loaded["model"]["bias"], before["bias"])
    assert loaded["extra"] == {"note": "kept"}


def test_per_call_override(tmp_path: Path) -> None:
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        assert isinstance(mgr.save(1, async_save=True, x={"a": 1}), torchkeep.SaveHandle)
        assert isinstance(mgr.save(2, x={"a": 2}), torchkeep.CheckpointRecord)
    with torchkeep.CheckpointManager(tmp_path, async_save=True) as mgr:
        assert isinstance(mgr.save(3, async_save=False, x={"a": 3}), torchkeep.CheckpointRecord)


class FailingStorage(MemoryStorage):
    """A storage whose disk 'fails' in the middle of writing the next N checkpoints."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0

    def begin(self, key: str, *, directory: bool) -> Any:
        txn = super().begin(key, directory=directory)
        if self.failures <= 0:
            return txn
        self.failures -= 1
        original = txn.open

        def open_failing(name: str = "") -> BinaryIO:
            f = original(name)

            class Broken(io.BytesIO):
                def write(self, data: Any) -> int:
                    raise torchkeep.StorageError(f"Could not write {key!r}: the disk is full.", path=key)

            return Broken() if name.endswith(".safetensors") else f

        txn.open = open_failing  # type: ignore[method-assign]
        return txn


def test_background_failure_surfaces_at_wait_next_save_and_close() -> None:
    storage = FailingStorage()
    mgr = torchkeep.CheckpointManager("run", async_save=True, storage=storage)
    w = {"w": torch.ones(8)}
    storage.failures = 1
    handle = mgr.save(1, x=w)
    with pytest.raises(torchkeep.StorageError, match="disk is full") as err:
        handle.wait()
    assert err.value.__traceback__ is not None
    storage.failures = 1
    mgr.save(2, x=w)  # (its write starts in the background; failures is read there)
    with pytest.raises(torchkeep.StorageError, match="disk is full"):
        mgr.save(3, x=w)  # the next save re-raises the previous failure ...
    mgr.save(4, x=w).wait()  # ... and the manager goes on
    storage.failures = 1
    mgr.save(5, x=w)
    with pytest.raises(torchkeep.StorageError, match="disk is full"):
        mgr.close()
    assert storage.list("run") == ["step-00000004"]  # nothing partial from the failed saves


def test_commits_are_ordered_and_retention_holds_with_saves_in_flight(tmp_path: Path) -> None:
    model = nn.Linear(64, 64)
    with torchkeep.CheckpointManager(tmp_path, keep_last=2, async_save=True) as mgr:
        handles = [mgr.save(step, metrics={"loss": 1.0 / step}, model=model) for step in range(1, 8)]
        assert all(h.done() for h in handles[:-1])  # each save waited for the one before
        handles[-1].wait()
        assert [r.step for r in mgr.list()] == [6, 7]


def test_staging_buffer_is_reused(tmp_path: Path) -> None:
    model = nn.Linear(128, 128)
    with torchkeep.CheckpointManager(tmp_path, keep_last=1, async_save=True) as mgr:
        for step in range(1, 11):
            mgr.save(step, model=model)
        sizes = mgr.staging_bytes
        assert mgr._staging.allocations == 1
        assert sizes >= sum(p.numel() * 4 for p in model.parameters())


def test_staging_bound_falls_back_to_a_synchronous_save(tmp_path: Path) -> None:
    model = nn.Linear(64, 64)
    with torchkeep.CheckpointManager(tmp_path, async_save=True, max_staging_bytes=20_000) as mgr:
        with pytest.warns(RuntimeWarning, match="saved synchronously"):
            result = mgr.save(1, model=model)
        assert isinstance(result, torchkeep.CheckpointRecord) and mgr.staging_bytes == 0
        assert isinstance(mgr.save(2, small={"x": torch.ones(4)}), torchkeep.SaveHandle)


def test_restore_waits_for_the_save_in_flight(tmp_path: Path) -> None:
    model = nn.Linear(32, 32)
    with torchkeep.CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save(1, model=model)
        twin = nn.Linear(32, 32)
        assert mgr.restore(model=twin).step == 1  # type: ignore[union-attr]
    assert torch.equal(twin.weight, model.weight)


CHILD = textwrap.dedent(
    """
    import os, signal, sys, time, torch, torchkeep
    path = sys.argv[1]
    with torchkeep.CheckpointManager(path, async_save=True) as mgr:
        mgr.save(1, state={"w": torch.full((4096, 1024), 1.0)}).wait()
        handle = mgr.save(2, state={"w": torch.full((4096, 1024), 2.0)})
        os.kill(os.getpid(), signal.SIGKILL)  # the write of step 2 is still running
    """
)


def test_sigkill_during_a_background_write_leaves_nothing_partial(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=ROOT, capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        steps = [r.step for r in mgr.list()]
        assert steps in ([1], [1, 2])  # step 2 is there only if it had fully committed
        state: dict[str, Any] = {}
        record = mgr.restore(state=state)
        assert record is not None and torch.equal(state["w"], torch.full((4096, 1024), float(record.step)))


EXIT = textwrap.dedent(
    """
    import sys, torch, torchkeep
    mgr = torchkeep.CheckpointManager(sys.argv[1], async_save=True)
    mgr.save(1, state={"w": torch.full((2048, 1024), 7.0)})
    # no wait() and no close(): the interpreter exits with the write in flight
    """
)


def test_interpreter_exit_waits_for_the_save_in_flight(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", EXIT, str(tmp_path)], cwd=ROOT, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        assert [r.step for r in mgr.list()] == [1]
        state: dict[str, Any] = {}
        mgr.restore(state=state)
    assert torch.equal(state["w"], torch.full((2048, 1024), 7.0))
