"""CheckpointManager in torch.distributed jobs: gloo ranks on the CPU, started here (see tests/dist_worker.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep
from tests import dist_worker as ranks
from tests.conftest import assert_same

pytestmark = pytest.mark.slow


def notes(folder: Path) -> dict[int, dict[str, Any]]:
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in folder.glob("rank-*.json")}


def test_fsdp2_saved_on_two_ranks_restores_exactly_on_one_and_on_three(tmp_path: Path) -> None:
    ranks.run(2, ranks.fsdp_save, tmp_path, str(tmp_path))
    step = tmp_path / "ckpt" / "step-00000003"
    assert sorted(os.listdir(step)) == ["manifest.json", "rank-00000.safetensors", "rank-00001.safetensors"]
    report = torchkeep.verify(str(step))
    assert report.method == "xxh3-64"
    expected = torch.load(tmp_path / "expected.pt")
    for world in (1, 3):
        ranks.run(world, ranks.fsdp_restore, tmp_path, str(tmp_path))
        assert_same(torch.load(tmp_path / f"restored-{world}.pt"), expected)  # every parameter and moment
    warned = notes(tmp_path)
    assert warned[0]["warned"] == [] and warned[1]["warned"] == []
    assert "rank 2 has no state of its own" in " ".join(warned[2]["warned"])  # saved by 2 ranks


def test_a_sharded_checkpoint_loads_whole_in_one_process_without_torch_distributed(tmp_path: Path) -> None:
    ranks.run(2, ranks.fsdp_save, tmp_path, str(tmp_path))
    expected = torch.load(tmp_path / "expected.pt")
    step = str(tmp_path / "ckpt" / "step-00000003")
    loaded = torchkeep.load(step)
    assert_same(dict(loaded["model"]), expected["model"])
    info = torchkeep.inspect(step)
    assert {t.name: t.shape for t in info.tensors}["model.l1.weight"] == (32, 16)  # whole, not its pieces
    assert not [t.name for t in info.tensors if "@" in t.name]
    # A plain model and optimizer in one process restore from it (optimizer state keyed by parameter name).
    torch.manual_seed(0)
    model = ranks.Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    record = torchkeep.CheckpointManager(tmp_path / "ckpt").restore(model=model, optimizer=optimizer)
    assert record is not None and record.step == 3
    assert_same(dict(model.state_dict()), expected["model"])
    moments = optimizer.state_dict()["state"][0]
    assert torch.equal(moments["exp_avg"], expected["optimizer"]["state"]["l1.weight"]["exp_avg"])
    # load_into and convert put the pieces together too; load_into reads only the part asked for.
    from torchkeep.formats.source import ManifestSource

    read: list[str] = []
    original = ManifestSource.read_arrays

    def recording(self: ManifestSource, **kwargs: Any) -> Any:
        read.extend(kwargs.get("names") or [])
        return original(self, **kwargs)

    ManifestSource.read_arrays = recording  # type: ignore[method-assign]
    try:
        fresh = ranks.Net()
        torchkeep.load_into(fresh, step, key="model")
    finally:
        ManifestSource.read_arrays = original  # type: ignore[method-assign]
    assert_same(dict(fresh.state_dict()), expected["model"])
    assert read and all(name.startswith("model.") for name in read)
    # Another shape is refused by name before anything is read into the model.
    other = ranks.Net()
    other.l1 = torch.nn.Linear(16, 30)
    other.l2 = torch.nn.Linear(30, 8)
    before = other.l2.bias.clone()
    with pytest.raises(torchkeep.StateMismatchError, match=r"model\.l1\.weight"):
        torchkeep.CheckpointManager(tmp_path / "ckpt").restore(model=other)
    assert torch.equal(other.l2.bias, before)

    from torchkeep.cli import main

    out = tmp_path / "model.safetensors"
    assert main(["convert", step, str(out)]) == 0
    assert torch.equal(torchkeep.load(str(out))["model"]["l2.bias"], expected["model"]["l2.bias"])


def test_a_damaged_piece_is_found_and_restore_falls_back(tmp_path: Path) -> None:
    ranks.run(2, ranks.fsdp_save, tmp_path, str(tmp_path))
    step = tmp_path / "ckpt" / "step-00000003"
    shard = step / "rank-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(torchkeep.ChecksumMismatchError, match="l2"):
        torchkeep.verify(str(step))
    model = ranks.Net()
    with pytest.raises(torchkeep.CorruptCheckpointError), pytest.warns(RuntimeWarning, match="Skipping"):
        torchkeep.CheckpointManager(tmp_path / "ckpt").restore(model=model)


def test_a_piece_damaged_on_one_rank_makes_every_rank_refuse_the_checkpoint(tmp_path: Path) -> None:
    ranks.run(2, ranks.fsdp_save, tmp_path, str(tmp_path))
    shard = tmp_path / "ckpt" / "step-00000003" / "rank-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[8 + int.from_bytes(data[:8], "little") + 1] ^= 0xFF  # the first piece of rank 1, read through DCP
    shard.write_bytes(bytes(data))
    ranks.run(2, ranks.fsdp_restore_damaged, tmp_path, str(tmp_path))
    seen = notes(tmp_path)
    assert seen[0]["error"] == seen[1]["error"] == "CorruptCheckpointError"  # none restored it, none hung
    assert "could be restored" in seen[0]["message"] and "rank 1" in seen[0]["message"]


@pytest.mark.parametrize(("how", "sharded"), [("kill", True), ("kill", False), ("raise", True), ("raise", False)])
def test_a_rank_that_dies_or_raises_during_a_save_commits_nothing(tmp_path: Path, how: str, sharded: bool) -> None:
    ranks.run(2, ranks.failing_save, tmp_path, str(tmp_path), how, sharded, killed=(1,) if how == "kill" else ())
    seen = notes(tmp_path)
    survivors = [0] if how == "kill" else [0, 1]
    for rank in survivors:
        assert seen[rank]["error"] in ("DistributedError", "OSError", "StorageError"), seen[rank]
        assert seen[rank]["seconds"] < 30  # noticed, not waited out
    assert any(seen[r]["error"] == "DistributedError" for r in survivors)
    manager = torchkeep.CheckpointManager(tmp_path / "ckpt")
    assert [r.step for r in manager.list()] == [1]  # step 2 was never committed
    assert not [n for n in os.listdir(tmp_path / "ckpt") if "tk-staging" in n]  # its staging was removed
    assert manager.restore(model=ranks.Net()) is not None


def test_a_rank_that_hangs_makes_the_others_raise_within_the_timeout(tmp_path: Path) -> None:
    ranks.run(2, ranks.failing_save, tmp_path, str(tmp_path), "hang", True)
    seen = notes(tmp_path)
    assert seen[0]["error"] == "DistributedError" and 3 < seen[0]["seconds"] < 12  # timeout=4
    assert seen[1]["error"] == "DistributedError"
    assert [r.step for r in torchkeep.CheckpointManager(tmp_path / "ckpt").list()] == [1]


def test_async_save_on_two_ranks_holds_the_state_at_the_call(tmp_path: Path) -> None:
    ranks.run(2, ranks.fsdp_async, tmp_path, str(tmp_path))
    states = torch.load(tmp_path / "async.pt")
    loaded = torchkeep.load(str(tmp_path / "ckpt" / "step-00000002"))
    assert_same(dict(loaded["model"]), states["at_save"]["model"])
    assert not torch.equal(states["after"]["model"]["l1.weight"], states["at_save"]["model"]["l1.weight"])


@pytest.mark.parametrize("async_save", [False, True])
def test_a_ddp_run_killed_mid_training_resumes_exactly(tmp_path: Path, async_save: bool) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    whole.mkdir()
    resumed.mkdir()
    ranks.run(2, ranks.ddp_training, whole, str(whole), 20, -1, async_save)
    ranks.run(2, ranks.ddp_training, resumed, str(resumed), 20, 13, async_save, killed=(0, 1))
    steps = [r.step for r in torchkeep.CheckpointManager(resumed / "ckpt").list()]
    assert steps == [9, 12]  # retention across ranks: rank 0 deleted; the save of step 12 committed
    ranks.run(2, ranks.ddp_training, resumed, str(resumed), 20, -1, async_save)
    for rank in (0, 1):  # every parameter, and each rank's own random stream
        assert torch.equal(torch.load(resumed / f"fingerprint-{rank}.pt"), torch.load(whole / f"fingerprint-{rank}.pt"))
    assert not torch.equal(torch.load(whole / "fingerprint-0.pt"), torch.load(whole / "fingerprint-1.pt"))
    seen = notes(resumed)
    assert seen[1] == {"locked": False, "steps": [15, 18]}  # only rank 0 took the lock
    # One process without torch.distributed restores the replicated state into a plain model ("module." goes).
    plain = ranks.Net()
    record = torchkeep.CheckpointManager(resumed / "ckpt").restore(model=plain)
    saved = torchkeep.load(str(resumed / "ckpt" / "step-00000018"))["model"]
    assert record is not None and record.step == 18
    assert torch.equal(plain.l1.weight, saved["module.l1.weight"])
    # A restore that fails after this rank's own state was put back leaves that state as it was.
    sampler = torchkeep.ResumableSampler(96, seed=3, num_replicas=2, rank=0)
    with pytest.raises(torchkeep.StateMismatchError):
        torchkeep.CheckpointManager(resumed / "ckpt").restore(model=torch.nn.Linear(3, 3), data=sampler)
    assert (sampler.epoch, sampler.position) == (0, 0)


def test_what_a_distributed_manager_cannot_do_is_refused_on_every_rank(tmp_path: Path) -> None:
    ranks.run(2, ranks.sharded_options_refused, tmp_path, str(tmp_path))
    seen = notes(tmp_path)
    for rank in (0, 1):
        compression, memory, group = seen[rank]["refused"]
        assert "compression= and incremental= are not available" in compression
        assert "only this process sees" in memory and "ProcessGroup" in group
    assert torchkeep.CheckpointManager(tmp_path / "ckpt").list() == []


def test_a_preemption_signal_on_one_rank_saves_and_stops_every_rank(tmp_path: Path) -> None:
    ranks.run(2, ranks.preempted_rank, tmp_path, str(tmp_path))  # every rank exits with status 0
    assert notes(tmp_path) == {0: {"saving": 3}, 1: {"saving": 3}}  # the loop ended at the save, on both
    assert [r.step for r in torchkeep.CheckpointManager(tmp_path / "ckpt").list()] == [3]


@pytest.mark.parametrize("how", ["steps", "locked"])
def test_ranks_that_disagree_or_fail_early_all_raise_at_once(tmp_path: Path, how: str) -> None:
    ranks.run(2, ranks.disagreeing_save, tmp_path, str(tmp_path), how)
    seen = notes(tmp_path)
    if how == "steps":
        assert seen[0]["error"] == seen[1]["error"] == "DistributedError"
        assert "different steps (rank 0: 5, rank 1: 6)" in seen[0]["message"]
    else:
        assert seen[0]["error"] == "DirectoryLockedError" and seen[1]["error"] == "DistributedError"
        assert "rank 0: DirectoryLockedError" in seen[1]["message"]
    assert all(seen[r]["seconds"] < 10 for r in (0, 1))  # not the timeout (20 s)
    assert [r.step for r in torchkeep.CheckpointManager(tmp_path / "ckpt").list()] == ([] if how == "steps" else [0])


def test_a_rank_whose_restore_fails_first_makes_every_rank_raise_at_once(tmp_path: Path) -> None:
    ranks.run(2, ranks.failing_restore, tmp_path, str(tmp_path))
    seen = notes(tmp_path)
    assert seen[0]["error"] == "StorageError" and seen[1]["error"] == "DistributedError"
    assert "rank 0: StorageError: listing failed" in seen[1]["message"]
    assert all(seen[r]["seconds"] < 10 for r in (0, 1))  # not the timeout (20 s)


def test_ranks_restoring_different_objects_all_refuse(tmp_path: Path) -> None:
    ranks.run(2, ranks.mismatched_restore, tmp_path, str(tmp_path))
    seen = notes(tmp_path)
    assert seen[0]["error"] == seen[1]["error"] == "DistributedError"
    assert "rank 0: step=None, ['model', 'optimizer'], rank 1: step=None, ['model']" in seen[0]["message"]


def test_a_manager_of_a_subgroup_is_built_and_saves_by_its_ranks_alone(tmp_path: Path) -> None:
    ranks.run(3, ranks.subgroup_save, tmp_path, str(tmp_path))
    seen = notes(tmp_path)
    assert seen[0] == seen[1] == {"steps": [1]}
    assert "Rank 2 is not in the process_group" in seen[2]["refused"]


def test_a_sharded_save_on_an_object_store(tmp_path: Path, s3_bucket: str) -> None:
    url = f"{s3_bucket}/run"
    ranks.run(2, ranks.fsdp_save, tmp_path, url, str(tmp_path))
    expected = torch.load(tmp_path / "expected.pt")
    step = f"{url}/ckpt/step-00000003"
    assert torchkeep.verify(step).method == "xxh3-64"
    torch.manual_seed(0)
    model = ranks.Net()
    record = torchkeep.CheckpointManager(f"{url}/ckpt").restore(model=model)
    assert record is not None and record.step == 3
    assert_same(dict(model.state_dict()), expected["model"])
