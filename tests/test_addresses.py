"""Every path torchkeep hands out is an address it can open again: memory:// records, registries, the CLI."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep.cli import main


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a URL taken for a relative path lands here, not in the checkout


@pytest.fixture
def store() -> str:
    """A memory store name no other test uses (memory:// stores live for the whole process)."""
    return f"addresses-{uuid.uuid4().hex[:8]}"


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))


def test_a_memory_record_path_loads_registers_and_inspects(capsys: Any, store: str) -> None:
    net = model()
    with torchkeep.CheckpointManager(f"memory://{store}/run") as mgr:
        record = mgr.save(10, metrics={"loss": 0.5}, model=net)
    assert isinstance(record, torchkeep.CheckpointRecord)
    assert record.path == f"memory://{store}/run/step-00000010"
    loaded = torchkeep.load(record.path)
    assert torch.equal(loaded["model"]["0.weight"], net[0].weight)

    registry = torchkeep.Registry(f"memory://{store}/reg")
    version = registry.register("m", record)
    assert version.lineage["checkpoint"] == record.path and version.lineage["step"] == 10
    assert version.path == f"memory://{store}/reg/models/m/v1"
    assert torch.equal(registry.load("m")["model"]["0.weight"], net[0].weight)
    assert torch.equal(torchkeep.load(version.path)["model"]["1.bias"], net[1].bias)

    assert main(["inspect", record.path]) == 0
    out = capsys.readouterr()
    assert "model.0.weight" in out.out, out.err


def test_a_memory_registry_reopened_sees_its_versions(store: str) -> None:
    first = torchkeep.Registry(f"memory://{store}/reg")
    first.register("m", model(), aliases=["prod"])
    again = torchkeep.Registry(f"memory://{store}/reg")
    assert again.models() == ["m"] and again.get("m", "prod").version == 1
    assert torchkeep.Registry(f"memory://{store}/other").models() == []


def test_a_memory_registry_touches_no_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: str) -> None:
    monkeypatch.chdir(tmp_path)
    registry = torchkeep.Registry(f"memory://{store}/reg")
    registry.register("m", {"w": torch.ones(2)})
    assert torch.equal(registry.load("m")["w"], torch.ones(2))
    assert list(tmp_path.iterdir()) == []


def test_a_registry_keeps_everything_under_its_folder(tmp_path: Path) -> None:
    registry = torchkeep.Registry(tmp_path / "deep" / "reg")
    registry.register("m", {"w": torch.ones(2)}, aliases=["prod"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep"]
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["reg"]
    assert {p.name for p in (tmp_path / "deep" / "reg").iterdir()} >= {"models", "index.sqlite"}
    assert registry.root == str(tmp_path / "deep" / "reg")
    assert torchkeep.Registry(f"file://{tmp_path}/deep/reg").get("m", "prod").version == 1


def test_a_registry_in_a_given_storage_stays_under_its_key() -> None:
    storage = torchkeep.MemoryStorage()
    registry = torchkeep.Registry("teams/a/reg", storage=storage)
    registry.register("m", {"w": torch.ones(2)})
    assert storage.list("") == ["teams"] and storage.list("teams/a/reg") == ["models"]
    assert torch.equal(torchkeep.load(registry.get("m").path)["w"], torch.ones(2))
