"""The torchkeep command, run in-process with arguments: exit statuses and --json output."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep.cli import main


def run(capsys: Any, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def as_json(capsys: Any, *args: str, status: int = 0) -> Any:
    code, out, err = run(capsys, *args, "--json")
    assert code == status, err
    return json.loads(out)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    with torchkeep.CheckpointManager(tmp_path / "run") as mgr:
        for step, loss in [(10, 0.9), (20, 0.4), (30, 0.6)]:
            with torch.no_grad():
                model[0].weight.add_(0.1)
            mgr.save(step, metrics={"loss": loss}, model=model)
    return tmp_path / "run"


def test_inspect(capsys: Any, run_dir: Path) -> None:
    data = as_json(capsys, "inspect", str(run_dir / "step-00000010"))
    assert data["format"] == "torchkeep" and data["format_version"] == 1
    assert {t["name"] for t in data["tensors"]} >= {"model.0.weight", "model.1.bias"}
    assert data["tree"]["model"]["0.weight"] == {"tensor": "model.0.weight", "dtype": "float32", "shape": [8, 4]}
    code, out, _ = run(capsys, "inspect", str(run_dir / "step-00000010"))
    assert code == 0 and "model.0.weight" in out and "float32" in out


def test_inspect_pth_runs_no_pickle_code(capsys: Any, tmp_path: Path) -> None:
    torch.save({"w": torch.ones(3)}, tmp_path / "plain.pth")
    data = as_json(capsys, "inspect", str(tmp_path / "plain.pth"))
    assert data["format"] == "torch-zip" and data["tensors"][0]["shape"] == [3]


def test_verify_exit_status(capsys: Any, run_dir: Path) -> None:
    good, bad = run_dir / "step-00000010", run_dir / "step-00000020"
    shard = bad / "data-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 1
    shard.write_bytes(bytes(data))
    assert run(capsys, "verify", str(good))[0] == 0
    code, out, _ = run(capsys, "verify", str(good), str(bad), "--json")
    assert code == 1
    results = json.loads(out)
    assert [r["ok"] for r in results] == [True, False] and results[1]["damaged"]


def test_diff(capsys: Any, run_dir: Path) -> None:
    data = as_json(capsys, "diff", str(run_dir / "step-00000010"), str(run_dir / "step-00000030"), status=1)
    changes = {c["key"]: c for c in data["changes"]}
    assert changes["model.0.weight"]["max_abs"] == pytest.approx(0.2, rel=1e-5)
    assert changes["model.1.weight"]["max_abs"] == 0
    assert not data["added"] and not data["removed"] and not data["identical"]
    code, out, _ = run(capsys, "diff", str(run_dir / "step-00000010"), str(run_dir / "step-00000030"))
    assert code == 1 and "model.0.weight" in out  # differences exit 1, like diff
    same = as_json(capsys, "diff", str(run_dir / "step-00000010"), str(run_dir / "step-00000010"))
    assert same["identical"]


@pytest.mark.parametrize("dst", ["out.safetensors", "out.pth", "out-dir"])
def test_convert(capsys: Any, tmp_path: Path, dst: str) -> None:
    src = tmp_path / "src"
    torchkeep.save({"model": nn.Linear(4, 8).state_dict(), "step": 3}, src)
    data = as_json(capsys, "convert", str(src), str(tmp_path / dst), "--dtype", "bf16")
    assert data["tensors"] == 2
    loaded = torchkeep.load(tmp_path / dst)
    assert loaded["model"]["weight"].dtype == torch.bfloat16 and loaded["step"] == 3


def test_convert_refusal_is_one_clear_line(capsys: Any, run_dir: Path, tmp_path: Path) -> None:
    # A manager checkpoint holds numpy's RNG state, which a .pth opened with weights_only cannot.
    code, _, err = run(capsys, "convert", str(run_dir / "step-00000010"), str(tmp_path / "x.pth"))
    assert code == 2 and "numpy" in err and err.count("\n") == 1
    assert not (tmp_path / "x.pth").exists()


def test_ls_flags_best_rules_and_damage(capsys: Any, run_dir: Path) -> None:
    (run_dir / "step-00000030" / "manifest.json").unlink()
    rows = as_json(capsys, "ls", str(run_dir), "--keep-last", "1", "--keep-best", "1", "--monitor", "loss")
    by_step = {r["step"]: r for r in rows["checkpoints"]}
    assert by_step[30]["state"] == "incomplete"
    assert by_step[20]["best"] and by_step[20]["kept_by"] == ["last 1", "best 1"]
    assert by_step[10]["kept_by"] == []
    code, out, _ = run(capsys, "ls", str(run_dir), "--monitor", "loss")
    assert code == 0 and "best" in out and "incomplete" in out


def test_prune(capsys: Any, run_dir: Path) -> None:
    data = as_json(capsys, "prune", str(run_dir), "--keep-last", "1", "--dry-run")
    assert data == {"would_delete": [10, 20], "kept": [30], "leftovers": []}
    assert len([p for p in os.listdir(run_dir) if p.startswith("step-")]) == 3
    data = as_json(capsys, "prune", str(run_dir), "--keep-last", "1", "--keep-best", "1", "--monitor", "loss")
    assert data == {"deleted": [10], "kept": [20, 30], "leftovers_removed": []}
    assert sorted(p for p in os.listdir(run_dir) if p.startswith("step-")) == ["step-00000020", "step-00000030"]
    data = as_json(capsys, "prune", str(run_dir))  # no policy: deletes no checkpoint
    assert data["deleted"] == [] and data["kept"] == [20, 30]


class Payload:
    def __reduce__(self) -> Any:
        return (os.system, ("touch should-not-exist",))


def test_scan_flags_a_malicious_pth_without_running_it(capsys: Any, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save({"x": Payload(), "w": torch.ones(2)}, tmp_path / "evil.pth")
    torch.save({"w": torch.ones(2), "opt": {"lr": 0.1}}, tmp_path / "clean.pth")
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    code, out, _ = run(capsys, "scan", str(tmp_path / "evil.pth"))
    assert code == 1 and "DANGEROUS" in out and "system" in out
    results = json.loads(run(capsys, "scan", str(tmp_path / "clean.pth"), str(tmp_path / "legacy.pt"), "--json")[1])
    assert [r["ok"] for r in results] == [True, True]
    assert not (tmp_path / "should-not-exist").exists()


def test_plot_writes_a_png(capsys: Any, run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "metrics.png"
    code, _, err = run(capsys, "plot", str(run_dir), "--out", str(out), "--monitor", "loss")
    assert code == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_models(capsys: Any, tmp_path: Path) -> None:
    registry = torchkeep.Registry(tmp_path / "reg")
    registry.register("clf", {"w": torch.ones(2)}, metadata={"accuracy": 0.8})
    registry.register("clf", {"w": torch.zeros(2)}, metadata={"accuracy": 0.95})
    root = str(tmp_path / "reg")
    assert as_json(capsys, "models", "ls", root) == [{"name": "clf", "versions": 2, "latest": 2, "aliases": {}}]
    assert run(capsys, "models", "alias", root, "clf", "production", "2")[0] == 0
    assert as_json(capsys, "models", "show", root, "clf", "production")["version"] == 2
    found = as_json(capsys, "models", "search", root, "clf", "--where", "accuracy>=0.9")
    assert [v["version"] for v in found] == [2]
    assert [v["version"] for v in as_json(capsys, "models", "ls", root, "clf")] == [1, 2]


def test_errors_are_one_line_and_non_zero(capsys: Any, tmp_path: Path) -> None:
    code, _, err = run(capsys, "inspect", str(tmp_path / "missing"))
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: No checkpoint") and "Traceback" not in err
    with pytest.raises(torchkeep.CheckpointNotFoundError):
        main(["--debug", "inspect", str(tmp_path / "missing")])
    assert run(capsys, "no-such-command")[0] == 2
