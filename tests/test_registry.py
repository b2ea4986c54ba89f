"""Registry: versions, aliases, search, immutability, deletion rules, concurrency, index rebuild, diff."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep

ROOT = Path(__file__).resolve().parents[1]


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_register_from_every_kind_of_source(tmp_path: Path) -> None:
    registry = torchkeep.Registry(tmp_path / "reg")
    model = net(0)
    v1 = registry.register("clf", model, metadata={"accuracy": 0.8}, tags=["baseline"], description="first")
    v2 = registry.register("clf", model.state_dict())
    torchkeep.save(model.state_dict(), tmp_path / "exported.safetensors")
    v3 = registry.register("clf", tmp_path / "exported.safetensors")
    with torchkeep.CheckpointManager(tmp_path / "run", monitor="loss") as mgr:
        mgr.save(40, metrics={"loss": 0.25}, model=model)
        v4 = registry.register("clf", mgr.best())  # type: ignore[arg-type]
    assert [v.version for v in (v1, v2, v3, v4)] == [1, 2, 3, 4]
    assert v1.lineage == {"source": "module", "class": "Sequential"} and v1.tags == ("baseline",)
    assert v1.description == "first" and v1.metadata == {"accuracy": 0.8}
    assert v2.lineage == {"source": "state_dict"}
    assert v3.lineage["checkpoint"].endswith("exported.safetensors")
    assert v4.lineage["step"] == 40 and v4.lineage["metrics"] == {"loss": 0.25}
    assert registry.models() == ["clf"]
    for v in (v1, v2, v3):
        twin = net(1)
        report = registry.load_into(twin, "clf", v.version)
        assert report.ok and torch.equal(twin[0].weight, model[0].weight)
    loaded = registry.load("clf", 4)
    assert torch.equal(loaded["model"]["0.weight"], model[0].weight)
    with pytest.raises(torchkeep.InvalidArgumentError, match="Cannot register"):
        registry.register("clf", 42)


def test_aliases_move_and_resolve(tmp_path: Path) -> None:
    registry = torchkeep.Registry(tmp_path)
    registry.register("m", net(0), aliases=["staging"])
    registry.register("m", net(1))
    assert registry.get("m", "staging").version == 1
    assert registry.get("m").version == 2 and registry.get("m", "latest").version == 2
    registry.set_alias("m", "production", 1)
    registry.set_alias("m", "staging", 2)
    assert registry.get("m", "staging").version == 2
    assert registry.get("m", 1).aliases == ("production",)
    twin = net(5)
    registry.load_into(twin, "m", "production")
    assert torch.equal(twin[0].weight, net(0)[0].weight)
    registry.remove_alias("m", "production")
    with pytest.raises(torchkeep.CheckpointNotFoundError, match="no alias 'production'"):
        registry.get("m", "production")
    with pytest.raises(torchkeep.CheckpointNotFoundError):
        registry.set_alias("m", "x", 9)
    for bad in ("3", "latest", "../up", ""):
        with pytest.raises(torchkeep.InvalidArgumentError):
            registry.set_alias("m", bad, 1)


def test_metadata_search(tmp_path: Path) -> None:
    registry = torchkeep.Registry(tmp_path)
    for acc, data in [(0.71, "a"), (0.93, "b"), (0.88, "b"), (0.95, "a")]:
        registry.register("m", {"w": torch.ones(1)}, metadata={"accuracy": acc, "dataset": data})
    registry.register("m", {"w": torch.ones(1)}, metadata={"note": "no accuracy"})
    registry.register("other", {"w": torch.ones(1)}, metadata={"accuracy": 0.99})
    good = registry.search("m", where={"accuracy": (">", 0.85)}, order_by="accuracy")
    assert [v.version for v in good] == [4, 2, 3]
    assert [v.version for v in registry.search("m", where={"dataset": "b"}, order_by="accuracy", descending=False)] == [
        3,
        2,
    ]
    ordered = registry.search("m", order_by="accuracy", limit=2)
    assert [v.version for v in ordered] == [4, 2]
    assert [v.version for v in registry.search("m", order_by="accuracy")][-1] == 5  # without it: last
    assert [(v.name, v.version) for v in registry.search(where={"accuracy": (">=", 0.95)})] == [("m", 4), ("other", 1)]
    with pytest.raises(torchkeep.InvalidArgumentError, match="operator"):
        registry.search("m", where={"accuracy": ("~", 1)})


def test_versions_are_immutable(tmp_path: Path) -> None:
    registry = torchkeep.Registry(tmp_path)
    v1 = registry.register("m", net(0), metadata={"a": 1})
    files = {p: p.read_bytes() for p in Path(v1.path).iterdir()}
    registry.register("m", net(1), metadata={"a": 2})
    registry.set_alias("m", "prod", 1)
    assert {p: p.read_bytes() for p in Path(v1.path).iterdir()} == files
    assert registry.get("m", 1).metadata == {"a": 1}
    torchkeep.verify(v1.path)


def test_deletion_rules(tmp_path: Path) -> None:
    registry = torchkeep.Registry(tmp_path)
    registry.register("m", net(0), aliases=["production"])
    registry.register("m", net(1))
    with pytest.raises(torchkeep.InvalidArgumentError, match=r"\['production'\] point at"):
        registry.delete("m", 1)
    registry.delete("m", 2)
    assert [v.version for v in registry.versions("m")] == [1]
    registry.delete("m", 1, force=True)
    assert registry.versions("m") == [] and registry.models() == []
    with pytest.raises(torchkeep.CheckpointNotFoundError):
        registry.delete("m", 1)
    assert registry.register("m", net(2)).version == 1  # numbering restarts only when nothing is left


def test_index_is_rebuilt_from_the_files(tmp_path: Path) -> None:
    registry = torchkeep.Registry(tmp_path)
    for i in range(3):
        registry.register("m", net(i), metadata={"accuracy": 0.5 + i / 10}, aliases=[f"a{i}"])
    registry.register("n", net(9))
    before = (registry.models(), registry.versions("m"), registry.search(where={"accuracy": (">", 0.55)}))
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(tmp_path / f"index.sqlite{suffix}"):
            os.remove(tmp_path / f"index.sqlite{suffix}")
    reopened = torchkeep.Registry(tmp_path)  # the index is missing: rebuilt on open
    assert (reopened.models(), reopened.versions("m"), reopened.search(where={"accuracy": (">", 0.55)})) == before
    reopened.rebuild_index()
    assert reopened.versions("m") == before[1]


def test_registry_on_memory_storage() -> None:
    registry = torchkeep.Registry("reg", storage=torchkeep.MemoryStorage())
    registry.register("m", net(0), metadata={"accuracy": 0.9}, aliases=["prod"])
    assert registry.get("m", "prod").version == 1
    assert [v.version for v in registry.search("m", where={"accuracy": (">", 0.5)})] == [1]


def test_diff_on_real_models(tmp_path: Path) -> None:
    registry = torchkeep.Registry(tmp_path)
    base = net(0)
    registry.register("m", base)
    tuned = net(0)
    with torch.no_grad():
        tuned[2].weight.add_(0.5)
    registry.register("m", tuned)
    wider = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3), nn.Linear(3, 3))
    registry.register("m", wider)
    d = registry.diff("m", 1, 2)
    assert d.max_abs_diff["2.weight"] == pytest.approx(0.5) and d.max_abs_diff["0.weight"] == 0
    assert not d.added and not d.removed and not d.identical
    d = registry.diff("m", 1, 3)
    assert d.added == ["3.weight", "3.bias"]
    assert ("0.weight", (8, 4), (16, 4)) in d.shape_changed
    assert registry.diff("m", 1, 1).identical
    assert "+ 3.weight" in str(d) and "~ 0.weight: [8, 4] -> [16, 4]" in str(d)


WORKER = textwrap.dedent(
    """
    import sys, torch, torchkeep
    registry = torchkeep.Registry(sys.argv[1])
    for i in range(int(sys.argv[3])):
        registry.register("shared", {"w": torch.full((4,), float(i))}, metadata={"writer": sys.argv[2], "i": i})
    """
)


def test_concurrent_registrations_from_two_processes(tmp_path: Path) -> None:
    torchkeep.Registry(tmp_path)  # create it before the race
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), writer, "50"], cwd=ROOT, stderr=subprocess.PIPE)
        for writer in ("a", "b")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    versions = torchkeep.Registry(tmp_path).versions("shared")
    assert [v.version for v in versions] == list(range(1, 101))  # distinct, none lost
    seen = {(v.metadata["writer"], v.metadata["i"]) for v in versions}
    assert seen == {(w, i) for w in "ab" for i in range(50)}
    assert sorted(n for n in os.listdir(tmp_path / "models" / "shared") if n.startswith("v")) == sorted(
        f"v{i}" for i in range(1, 101)
    )
