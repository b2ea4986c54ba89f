"""Incremental checkpoints: unchanged tensors stored once, every checkpoint whole on its own, no garbage."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep

ROOT = Path(__file__).resolve().parents[1]


def frozen_model() -> nn.Module:
    torch.manual_seed(0)
    # Three frozen 256 KiB weights and a trained 128 KiB head: all of them large enough to be shared.
    return nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 128))


def finetune_step(model: nn.Module, k: int) -> None:
    with torch.no_grad():
        model[3].weight.add_(0.01 * k)  # only the head changes; the backbone is frozen


def referenced(directory: Path) -> set[str]:
    names = set()
    for ckpt in directory.glob("step-*"):
        manifest = json.loads((ckpt / "manifest.json").read_text())
        names |= {s["file"] for s in manifest["shards"] if s.get("shared")}
    return names


def assert_no_garbage(directory: Path) -> None:
    stored = set(os.listdir(directory / "objects")) if (directory / "objects").exists() else set()
    assert stored == referenced(directory), "objects on disk must be exactly those committed checkpoints refer to"


def save_run(directory: Path, steps: list[int]) -> nn.Module:
    model = frozen_model()
    with torchkeep.CheckpointManager(directory, incremental=True) as mgr:
        for k in steps:
            finetune_step(model, k)
            mgr.save(k, model=model)
    return model


def test_unchanged_tensors_are_stored_once(tmp_path: Path) -> None:
    model = save_run(tmp_path, [1, 2, 3])
    objects = os.listdir(tmp_path / "objects")
    assert len(objects) == 3 + 3  # three frozen weights once, the head's weight three times
    for step in (1, 2, 3):
        ckpt = tmp_path / f"step-{step:08d}"
        torchkeep.verify(ckpt)
        info = torchkeep.inspect(ckpt)
        shared = {t.name for t in info.tensors if t.shared}
        assert shared == {"model.0.weight", "model.1.weight", "model.2.weight", "model.3.weight"}
        assert "shared" in str(info)
    loaded = torchkeep.load(tmp_path / "step-00000003")["model"]
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert_no_garbage(tmp_path)
    sizes = [sum(f.stat().st_size for f in (tmp_path / f"step-{s:08d}").iterdir()) for s in (1, 2, 3)]
    full = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert max(sizes) < 0.05 * full  # a checkpoint holds its manifest, RNG state and the small tensors


@pytest.mark.parametrize("order", list(itertools.permutations([1, 2, 3, 4])), ids=str)
def test_deleting_in_any_order_keeps_the_rest_whole(tmp_path: Path, order: tuple[int, ...]) -> None:
    save_run(tmp_path, [1, 2, 3, 4])
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        for i, step in enumerate(order):
            mgr.delete(step)
            for left in order[i + 1 :]:
                torchkeep.verify(tmp_path / f"step-{left:08d}")
            assert_no_garbage(tmp_path)
    assert not os.listdir(tmp_path / "objects")


def test_retention_with_incremental_checkpoints(tmp_path: Path) -> None:
    model = frozen_model()
    with torchkeep.CheckpointManager(tmp_path, incremental=True, keep_last=2) as mgr:
        for k in range(1, 7):
            finetune_step(model, k)
            mgr.save(k, model=model)
        assert [r.step for r in mgr.list()] == [5, 6]
    for step in (5, 6):
        torchkeep.verify(tmp_path / f"step-{step:08d}")
    assert_no_garbage(tmp_path)
    assert len(os.listdir(tmp_path / "objects")) == 3 + 2


def test_export_is_self_contained(tmp_path: Path) -> None:
    model = save_run(tmp_path / "run", [1, 2])
    torchkeep.save(torchkeep.load(tmp_path / "run" / "step-00000002"), tmp_path / "export")
    torchkeep.save(torchkeep.load(tmp_path / "run" / "step-00000002"), tmp_path / "export.safetensors")
    for path in (tmp_path / "run" / "objects",):
        for f in path.iterdir():
            f.unlink()
    with pytest.raises(torchkeep.CorruptCheckpointError):
        torchkeep.load(tmp_path / "run" / "step-00000002")
    for export in ("export", "export.safetensors"):
        loaded = torchkeep.load(tmp_path / export)["model"]
        assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_damaged_object_is_named_in_every_checkpoint_using_it(tmp_path: Path) -> None:
    save_run(tmp_path, [1, 2])
    manifest = json.loads((tmp_path / "step-00000001" / "manifest.json").read_text())
    shared = next(t for t in manifest["tensors"] if t["name"] == "model.0.weight")
    obj = tmp_path / "objects" / shared["shard"]
    data = bytearray(obj.read_bytes())
    data[-10] ^= 1
    obj.write_bytes(bytes(data))
    for step in (1, 2):
        with pytest.raises(torchkeep.ChecksumMismatchError) as err:
            torchkeep.verify(tmp_path / f"step-{step:08d}")
        assert err.value.damaged == ["model.0.weight"]


CHILD = textwrap.dedent(
    """
    import os, signal, sys, torch, torchkeep
    from torch import nn
    from torchkeep import manager as manager_module
    from torchkeep.formats import native

    path, point = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 8))
    mgr = torchkeep.CheckpointManager(path, incremental=True, keep_last=1)
    mgr.save(1, model=model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # everything changes: step 2 writes new objects
    if point == "save":
        real = native.store_object
        count = [0]
        def store(*args, **kwargs):
            count[0] += 1
            if count[0] == 2:
                os.kill(os.getpid(), signal.SIGKILL)  # one new object written, no manifest yet
            return real(*args, **kwargs)
        native.store_object = store
    else:
        real_delete = mgr._run.storage.delete
        calls = [0]
        def delete(key):
            if "/objects/" in key or key.startswith("objects/"):
                calls[0] += 1
                if calls[0] == 2:
                    os.kill(os.getpid(), signal.SIGKILL)  # the sweep removed one object of step 1
            return real_delete(key)
        mgr._run.storage.delete = delete
    mgr.save(2, model=model)
    """
)


@pytest.mark.parametrize("point", ["save", "sweep"])
def test_sigkill_during_save_or_sweep_loses_nothing_and_leaves_no_lasting_garbage(tmp_path: Path, point: str) -> None:
    result = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), point], cwd=ROOT, capture_output=True)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    with torchkeep.CheckpointManager(tmp_path, incremental=True, keep_last=1) as mgr:
        for record in mgr.list():
            torchkeep.verify(record.path)  # every committed checkpoint is whole
        assert [r.step for r in mgr.list()] == ([1] if point == "save" else [2])
        mgr.save(3, extra={"x": torch.zeros(1)})  # the next save sweeps what the dead writer left
    assert_no_garbage(tmp_path)
    state: dict[str, Any] = {}
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        mgr.restore(extra=state)
    assert torch.equal(state["x"], torch.zeros(1))
