"""The torchkeep command on s3:// URLs (moto's S3 server on 127.0.0.1), run in-process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from tests.test_cli import as_json, run


@pytest.fixture
def run_url(s3_bucket: str) -> str:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    url = f"{s3_bucket}/run"
    with torchkeep.CheckpointManager(url) as mgr:
        for step, loss in [(10, 0.9), (20, 0.4), (30, 0.6)]:
            with torch.no_grad():
                model[0].weight.add_(0.1)
            mgr.save(step, metrics={"loss": loss}, model=model.state_dict())
    return url


def test_ls_inspect_verify_diff_on_s3(capsys: Any, run_url: str) -> None:
    rows = as_json(capsys, "ls", run_url, "--monitor", "loss", "--keep-last", "1")["checkpoints"]
    assert [(r["step"], r["state"], r["best"]) for r in rows] == [
        (10, "ok", False),
        (20, "ok", True),
        (30, "ok", False),
    ]
    data = as_json(capsys, "inspect", f"{run_url}/step-00000020")
    assert data["format"] == "torchkeep" and {t["name"] for t in data["tensors"]} >= {"model.0.weight"}
    results = as_json(capsys, "verify", run_url)
    assert [r["ok"] for r in results] == [True, True, True] and all(r["path"].startswith("s3://") for r in results)
    diff = as_json(capsys, "diff", f"{run_url}/step-00000010", f"{run_url}/step-00000020", status=1)
    assert not diff["identical"]


def test_verify_on_s3_finds_damage(capsys: Any, run_url: str) -> None:
    storage, key = torchkeep.storage.resolve(f"{run_url}/step-00000020")
    shard = f"{key}/data-00000.safetensors"
    data = bytearray(storage.read(shard))
    data[-1] ^= 0xFF
    with storage.begin(key, directory=True) as txn:  # a whole new generation, one byte changed
        for name in storage.list(key):
            with txn.open(name) as f:
                f.write(bytes(data) if name == "data-00000.safetensors" else storage.read(f"{key}/{name}"))
    results = as_json(capsys, "verify", run_url, status=1)
    assert [r["ok"] for r in results] == [True, False, True]


def test_prune_on_s3(capsys: Any, run_url: str) -> None:
    assert as_json(capsys, "prune", run_url, "--keep-last", "1", "--dry-run")["would_delete"] == [10, 20]
    result = as_json(capsys, "prune", run_url, "--keep-last", "1", "--monitor", "loss", "--keep-best", "1")
    assert result["deleted"] == [10] and result["kept"] == [20, 30]
    assert [r["step"] for r in as_json(capsys, "ls", run_url)["checkpoints"]] == [20, 30]


def test_convert_to_and_from_s3(capsys: Any, run_url: str, tmp_path: Path) -> None:
    bucket = run_url.rsplit("/", 1)[0]
    expected = torchkeep.load(f"{run_url}/step-00000030")["model"]
    source = f"{bucket}/src"  # the tensors alone: a .pth cannot hold the manager's numpy RNG state
    torchkeep.save({"model": expected}, source)
    for dst in (f"{bucket}/out/model.safetensors", f"{bucket}/out/model.pth", f"{bucket}/out/native"):
        result = as_json(capsys, "convert", source, dst)
        assert result["dst"] == dst and result["tensors"] >= 4
        assert torch.equal(torchkeep.load(dst)["model"]["0.weight"], expected["0.weight"])
    local = tmp_path / "back.safetensors"
    as_json(capsys, "convert", f"{bucket}/out/model.pth", str(local))  # from s3 to a local file
    as_json(capsys, "convert", str(local), f"{bucket}/out/again")  # and from a local file to s3
    assert torch.equal(torchkeep.load(f"{bucket}/out/again")["model"]["0.weight"], expected["0.weight"])


def test_scan_and_plot_on_s3(capsys: Any, run_url: str, tmp_path: Path) -> None:
    bucket = run_url.rsplit("/", 1)[0]
    torchkeep.save({"w": torch.ones(2)}, f"{bucket}/plain.pth")
    results = as_json(capsys, "scan", f"{run_url}/step-00000010", f"{bucket}/plain.pth")
    assert [(r["path"], r["ok"], r["pickle_free"]) for r in results] == [
        (f"{run_url}/step-00000010", True, True),
        (f"{bucket}/plain.pth", True, False),
    ]
    code, _, err = run(capsys, "plot", run_url)
    assert code == 2 and "not on this machine" in err  # never a local path made from a URL
    pytest.importorskip("matplotlib")
    assert as_json(capsys, "plot", run_url, "--out", str(tmp_path / "m.png"))["checkpoints"] == 3


def test_registry_commands_on_s3(capsys: Any, s3_bucket: str, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("TORCHKEEP_CACHE_DIR", str(tmp_path / "cache"))
    url = f"{s3_bucket}/reg"
    registry = torchkeep.Registry(url)
    for acc in (0.5, 0.9):
        registry.register("m", {"w": torch.full((3,), acc)}, metadata={"accuracy": acc})
    assert as_json(capsys, "models", "ls", url) == [{"name": "m", "versions": 2, "latest": 2, "aliases": {}}]
    assert as_json(capsys, "models", "alias", url, "m", "prod", "1")["version"] == 1
    assert as_json(capsys, "models", "show", url, "m", "prod")["version"] == 1
    assert [r["version"] for r in as_json(capsys, "models", "search", url, "--where", "accuracy>0.6")] == [2]
    assert [r["ok"] for r in as_json(capsys, "verify", url)] == [True, True]
    code, _, err = run(capsys, "models", "ls", f"{s3_bucket}/nothing")
    assert code == 2 and "not an existing directory" in err


def test_transfers_are_observed_and_shown_only_after_a_second(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.progress import Progress

    from torchkeep import cli
    from torchkeep.storage.objectstore import observe_transfers

    moved: dict[str, int] = {"up": 0, "down": 0}
    state = {"w": torch.randn(1024, 256)}  # 1 MiB
    with observe_transfers(lambda direction, n: moved.__setitem__(direction, moved[direction] + n)):
        torchkeep.save(state, f"{s3_bucket}/run/a")
        torchkeep.load(f"{s3_bucket}/run/a")
    assert moved["up"] >= 1 << 20 and moved["down"] >= 1 << 20
    started: list[bool] = []
    monkeypatch.setattr(Progress, "start", lambda self: started.append(True))
    monkeypatch.setattr(Progress, "stop", lambda self: None)
    with cli._transfers(after=60.0):
        torchkeep.load(f"{s3_bucket}/run/a")
    assert started == []  # a short transfer draws nothing
    with cli._transfers(after=0.0):
        torchkeep.load(f"{s3_bucket}/run/a")
    assert started == [True]
