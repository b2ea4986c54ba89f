"""CheckpointManager: saving, listing, retention, fallback restore, locks, preemption and exact resume."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import torchkeep

ROOT = Path(__file__).resolve().parents[1]


def model_and_opt(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def steps_on_disk(directory: Path) -> list[str]:
    return sorted(p for p in os.listdir(directory) if p.startswith("step-"))


def test_save_list_latest_best(tmp_path: Path) -> None:
    model, _ = model_and_opt()
    with torchkeep.CheckpointManager(tmp_path, monitor="val", mode="max") as mgr:
        assert mgr.list() == [] and mgr.latest() is None and mgr.best() is None
        for step, val in [(100, 0.5), (9, 0.7), (20, 0.6)]:  # out of order on purpose
            record = mgr.save(step, metrics={"val": torch.tensor(val)}, metadata={"note": str(step)}, model=model)
            assert record.step == step and record.metrics == {"val": pytest.approx(val)}
        records = mgr.list()
        assert [r.step for r in records] == [9, 20, 100]  # by step, not by name or time
        assert records[0].metadata == {"note": "9"} and records[0].size > 0 and records[0].created > 0
        assert mgr.latest().step == 100  # type: ignore[union-attr]
        assert mgr.best().step == 9  # type: ignore[union-attr]
    assert steps_on_disk(tmp_path) == ["step-00000009", "step-00000020", "step-00000100"]


def test_restore_round_trip_and_fresh_start(tmp_path: Path) -> None:
    model, opt = model_and_opt()
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        assert mgr.restore(model=model) is None  # a fresh start, not an error
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        mgr.save(1, model=model, optimizer=opt, extra={"epoch": 4, "name": "run"})
    twin, twin_opt = model_and_opt(seed=1)
    extra: dict[str, Any] = {}
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        record = mgr.restore(model=twin, optimizer=twin_opt, extra=extra)
    assert record is not None and record.step == 1
    assert extra == {"epoch": 4, "name": "run"}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True))
    assert twin_opt.state_dict()["state"][0]["exp_avg"].shape == (8, 4)


def test_rng_is_restored_without_reseeding(tmp_path: Path) -> None:
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        mgr.save(1)
        expected = (random.random(), np.random.rand(), torch.rand(2))
        random.seed(99)
        np.random.seed(99)
        torch.manual_seed(99)
        mgr.restore()
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_retention_keep_last_and_best(tmp_path: Path) -> None:
    model, _ = model_and_opt()
    losses = {1: 0.9, 2: 0.2, 3: 0.8, 4: 0.7, 5: 0.6, 6: 0.65}
    with torchkeep.CheckpointManager(tmp_path, keep_last=2, keep_best=1, monitor="loss") as mgr:
        for step, loss in losses.items():
            mgr.save(step, metrics={"loss": loss}, model=model)
        assert [r.step for r in mgr.list()] == [2, 5, 6]
    assert steps_on_disk(tmp_path) == ["step-00000002", "step-00000005", "step-00000006"]
    # Re-opened with a tighter policy: the same rules apply to what is there, at the next save.
    with torchkeep.CheckpointManager(tmp_path, keep_last=1, keep_best=1, monitor="loss") as mgr:
        assert [r.step for r in mgr.list()] == [2, 5, 6]
        mgr.save(7, metrics={"loss": 0.5}, model=model)
        assert [r.step for r in mgr.list()] == [2, 7]


def test_saving_an_earlier_step_never_deletes_it(tmp_path: Path) -> None:
    with torchkeep.CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.save(10)
        record = mgr.save(3)  # a rewound run saves below the newest: it stays
        assert record.step == 3 and [r.step for r in mgr.list()] == [3, 10]
        mgr.save(11)
        assert [r.step for r in mgr.list()] == [11]


def test_keep_every_and_nan_metrics(tmp_path: Path) -> None:
    with torchkeep.CheckpointManager(tmp_path, keep_last=1, keep_every=10, monitor="loss") as mgr:
        for step in range(5, 31, 5):
            mgr.save(step, metrics={"loss": float("nan") if step == 25 else float(step)})
        assert [r.step for r in mgr.list()] == [5, 10, 20, 30]  # 5 is the best, 10/20/30 milestones
        assert mgr.list()[-1].metrics["loss"] == 30.0
        mgr.save(35, metrics={"loss": float("nan")})
        assert math.isnan(next(r for r in mgr.list() if r.step == 35).metrics["loss"])


def test_same_step_twice_replaces_atomically(tmp_path: Path) -> None:
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        mgr.save(5, extra={"v": 1, "w": torch.ones(3)})
        mgr.save(5, extra={"v": 2})
        extra: dict[str, Any] = {}
        mgr.restore(extra=extra)
    assert extra == {"v": 2}
    assert sorted(os.listdir(tmp_path / "step-00000005")) == ["data-00000.safetensors", "manifest.json"]


def damage(directory: Path, how: str) -> None:
    shard = directory / "data-00000.safetensors"
    if how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif how == "bit-flipped":
        data = bytearray(shard.read_bytes())
        data[-5] ^= 0x10
        shard.write_bytes(bytes(data))
    elif how == "no-manifest":
        (directory / "manifest.json").unlink()


@pytest.mark.parametrize("how", ["truncated", "bit-flipped", "no-manifest"])
def test_restore_falls_back_past_a_damaged_newest(tmp_path: Path, how: str) -> None:
    model, _ = model_and_opt()
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, model=model, extra={"step": 1})
        mgr.save(2, model=model, extra={"step": 2})
    damage(tmp_path / "step-00000002", how)
    extra: dict[str, Any] = {}
    with torchkeep.CheckpointManager(tmp_path) as mgr, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = mgr.restore(model=model, extra=extra)
    assert record is not None and record.step == 1 and extra == {"step": 1}
    if how != "no-manifest":  # a directory without a manifest is simply not a checkpoint
        assert any("step 2" in str(w.message) for w in caught)
        with torchkeep.CheckpointManager(tmp_path) as mgr, pytest.raises(torchkeep.CorruptCheckpointError):
            mgr.restore(2, model=model)


def test_restore_errors(tmp_path: Path) -> None:
    model, _ = model_and_opt()
    with torchkeep.CheckpointManager(tmp_path, monitor="loss") as mgr:
        mgr.save(1, model=model)
        with pytest.raises(torchkeep.CheckpointNotFoundError, match="no checkpoint of step 7"):
            mgr.restore(7, model=model)
        with pytest.raises(torchkeep.CheckpointNotFoundError, match="metric 'loss'"):
            mgr.restore("best", model=model)
        with pytest.raises(torchkeep.StateMismatchError, match="no state named"):
            mgr.restore(optimizer=model_and_opt()[1])
        with pytest.raises(torchkeep.InvalidArgumentError, match="reserved"):
            mgr.save(2, _torchkeep_rng={})
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        damage(tmp_path / "step-00000001", "bit-flipped")
        with pytest.warns(RuntimeWarning), pytest.raises(torchkeep.CorruptCheckpointError, match="could be restored"):
            mgr.restore(model=model)


def test_restore_best(tmp_path: Path) -> None:
    with torchkeep.CheckpointManager(tmp_path, monitor="acc", mode="max") as mgr:
        for step, acc in [(1, 0.5), (2, 0.9), (3, 0.7)]:
            mgr.save(step, metrics={"acc": acc}, extra={"step": step})
        extra: dict[str, Any] = {}
        assert mgr.restore("best", extra=extra).step == 2  # type: ignore[union-attr]
        assert extra == {"step": 2}


def test_should_save(tmp_path: Path) -> None:
    with torchkeep.CheckpointManager(tmp_path, save_every=3) as mgr:
        assert [s for s in range(1, 10) if mgr.should_save(s)] == [3, 6, 9]
    with torchkeep.CheckpointManager(tmp_path, save_interval=0.05) as mgr:
        assert not mgr.should_save(1)
        time.sleep(0.06)
        assert mgr.should_save(2)
        mgr.save(2)
        assert not mgr.should_save(3)


def test_constructing_and_reading_take_no_lock(tmp_path: Path) -> None:
    model, _ = model_and_opt()
    with torchkeep.CheckpointManager(tmp_path) as writer:
        writer.save(1, model=model)
        reader = torchkeep.CheckpointManager(tmp_path)  # alive, while the writer holds the lock
        assert [r.step for r in reader.list()] == [1]
        assert reader.latest() is not None and reader.restore(model=model) is not None
        writer.save(2, model=model)  # the reader never blocked the writer
        assert [r.step for r in reader.list()] == [1, 2]


def test_list_then_write_in_the_same_script(tmp_path: Path) -> None:
    model, _ = model_and_opt()
    torchkeep.CheckpointManager(tmp_path).list()  # the object is not even collected yet in some interpreters
    mgr = torchkeep.CheckpointManager(tmp_path, keep_last=1)
    mgr.save(1, model=model)
    mgr.save(2, model=model)
    mgr.save(3, model=model)
    mgr.close()
    from torchkeep.cli import main

    keep = torchkeep.CheckpointManager(tmp_path, keep_last=2)
    mgr = torchkeep.CheckpointManager(tmp_path)
    mgr.save(2, model=model)  # a writer after a reader, both alive
    assert [r.step for r in keep.list()] == [2, 3]
    mgr.close()
    assert main(["prune", str(tmp_path), "--keep-last", "1"]) == 0  # the reader does not block the CLI's writes
    assert [r.step for r in keep.list()] == [3]


def test_a_manager_created_again_in_one_process_saves(tmp_path: Path) -> None:
    """Re-running a notebook cell ``mgr = CheckpointManager(d); mgr.save(...)``."""
    model, _ = model_and_opt()
    mgr = torchkeep.CheckpointManager(tmp_path)
    mgr.save(1, model=model)
    mgr = torchkeep.CheckpointManager(tmp_path)  # the old writer is collected: its finalizer unlocks
    mgr.save(2, model=model)
    mgr = torchkeep.CheckpointManager(tmp_path, async_save=True)
    mgr.save(3, model=model)
    mgr = torchkeep.CheckpointManager(tmp_path, async_save=True)  # the old one's save in flight is finished first
    mgr.save(4, model=model)
    mgr.close()
    assert [r.step for r in torchkeep.CheckpointManager(tmp_path).list()] == [1, 2, 3, 4]


def test_two_live_writers_in_one_process(tmp_path: Path) -> None:
    model, _ = model_and_opt()
    first = torchkeep.CheckpointManager(tmp_path)
    second = torchkeep.CheckpointManager(tmp_path)
    first.save(1, model=model)
    with pytest.raises(torchkeep.DirectoryLockedError, match=rf"pid {os.getpid()} on host \S+") as caught:
        second.save(2, model=model)
    assert "Reading needs no lock" in str(caught.value)
    with pytest.raises(torchkeep.DirectoryLockedError):
        second.delete(1)
    first.close()
    second.save(2, model=model)  # the lock is free once the first writer closed
    second.close()
    storage = torchkeep.MemoryStorage()
    mem = torchkeep.CheckpointManager("run", storage=storage)
    other = torchkeep.CheckpointManager("run", storage=storage)
    mem.save(1, model=model)
    with pytest.raises(torchkeep.DirectoryLockedError, match="in this process"):
        other.save(2, model=model)
    mem.close()
    other.save(2, model=model)
    other.close()


def test_closing_is_final_and_collection_releases(tmp_path: Path) -> None:
    import gc
    import weakref

    model, _ = model_and_opt()
    mgr = torchkeep.CheckpointManager(tmp_path)
    mgr.save(1, model=model)
    ref = weakref.ref(mgr)
    del mgr
    gc.collect()
    assert ref() is None  # nothing (no atexit hook, no signal handler) keeps a manager alive
    closed = torchkeep.CheckpointManager(tmp_path)
    closed.close()
    with pytest.raises(torchkeep.InvalidArgumentError, match="closed"):
        closed.save(2, model=model)
    with torchkeep.CheckpointManager(tmp_path, install_signal_handler=True) as handled:
        ref = weakref.ref(handled)
    del handled
    gc.collect()
    assert ref() is None


HOLDER = (
    "import sys, time, torch, torchkeep\n"
    "m = torchkeep.CheckpointManager(sys.argv[1])\n"
    "m.save(1, w=torch.ones(2))\n"
    "print('locked', flush=True)\n"
    "time.sleep(60)\n"
)


def test_second_writer_process_is_refused_and_a_killed_one_releases(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        other = torchkeep.CheckpointManager(tmp_path)
        assert [r.step for r in other.list()] == [1]  # reading is never refused
        with pytest.raises(torchkeep.DirectoryLockedError, match=f"pid {proc.pid} on host {socket.gethostname()}"):
            other.save(2, w=torch.zeros(2))
    finally:
        proc.kill()
        proc.communicate()
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        mgr.save(2, w=torch.zeros(2))  # the kernel released the dead holder's lock


SAVER = (
    "import sys, torch, torchkeep\n"
    "mgr = torchkeep.CheckpointManager(sys.argv[1], keep_last=3)\n"
    "for step in range(1, int(sys.argv[2]) + 1):\n"
    "    mgr.save(step, state={'w': torch.full((256, 256), float(step)), 'b': torch.full((3,), float(step))})\n"
    "    if step == 1: print('first', flush=True)\n"
    "mgr.close()\n"
)


def test_a_reader_process_restores_while_a_writer_saves_in_a_loop(tmp_path: Path) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(tmp_path), "150"], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "first"
        reader = torchkeep.CheckpointManager(tmp_path)
        restored_steps = set()
        while writer.poll() is None:
            state: dict[str, Any] = {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a step deleted by retention between list and read
                record = reader.restore(state=state)
            assert record is not None
            # Always one complete step: every tensor holds the value of the step restored.
            assert bool((state["w"] == record.step).all()) and bool((state["b"] == record.step).all())
            restored_steps.add(record.step)
        assert writer.returncode == 0
    finally:
        writer.kill()
        writer.communicate()
    assert len(restored_steps) > 1


def test_manager_on_memory_storage() -> None:
    model, _ = model_and_opt()
    storage = torchkeep.MemoryStorage()
    with torchkeep.CheckpointManager("runs/a", keep_last=1, storage=storage) as mgr:
        mgr.save(1, model=model)
        mgr.save(2, model=model)
        assert [r.step for r in mgr.list()] == [2]
        assert mgr.restore(model=model).step == 2  # type: ignore[union-attr]
    assert storage.list("runs/a") == ["step-00000002"]


def run_script(directory: Path, total: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.train_script", str(directory), str(total), *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_killed_and_resumed_training_is_bit_exact(tmp_path: Path) -> None:
    reference = run_script(tmp_path / "reference", 30)
    assert reference.returncode == 0, reference.stderr
    run = tmp_path / "run"
    for kill_at in (7, 18, 26):  # between saves, right after a save, near the end
        killed = run_script(run, 30, "--kill-at", str(kill_at))
        assert killed.returncode == -signal.SIGKILL, killed.stderr
    final = run_script(run, 30)
    assert final.returncode == 0, final.stderr
    assert final.stdout.splitlines()[0] == "start 25"
    # Same weights bit for bit, and the loader handed out the same number of samples.
    assert final.stdout.splitlines()[-1] == reference.stdout.splitlines()[-1]
    assert final.stdout.splitlines()[-2] == reference.stdout.splitlines()[-2]
    ref_losses = [line for line in reference.stdout.splitlines() if line.startswith("step 2")]
    got_losses = [line for line in final.stdout.splitlines() if line.startswith("step 2")]
    assert got_losses == ref_losses[-len(got_losses) :]


def test_sigterm_saves_at_the_next_step_and_exits_cleanly(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.train_script", str(tmp_path), "1000", "--slow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    seen = []
    while not (line := proc.stdout.readline()).startswith("step 3"):
        assert line, "the script stopped before step 3"
        seen.append(line)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = [*seen, line, *out.splitlines()]
    last_step = max(int(text.split()[1]) for text in lines if text.startswith("step"))
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        assert mgr.latest().step == last_step  # type: ignore[union-attr]
        assert last_step < 1000


RESTORE_PEAK = textwrap.dedent(
    """
    import json, re, sys
    import torch, torchkeep
    from torch import nn

    def status(field):
        text = open("/proc/self/status").read()
        return int(re.search(rf"^{field}:\\s+(\\d+) kB", text, re.M).group(1)) * 1024

    path, mode, compression = sys.argv[1], sys.argv[2], sys.argv[3] or None
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(32)])  # 32 x 16 MiB = 512 MiB
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mgr = torchkeep.CheckpointManager(path, compression=compression)
    if mode == "save":
        mgr.save(1, model=model, optimizer=optimizer)
        sys.exit(0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    record = mgr.restore(model=model, optimizer=optimizer)
    extra = status("VmHWM") - before
    torch.manual_seed(0)
    again = nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(32)])
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    print(json.dumps({"extra_peak": extra, "step": record.step, "same": same}))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("compression", ["", "zstd"])
def test_restore_streams_with_extra_memory_near_a_few_tensors(tmp_path: Path, compression: str) -> None:
    largest = 16 * 1024 * 1024
    path = str(tmp_path / "run")
    subprocess.run([sys.executable, "-c", RESTORE_PEAK, path, "save", compression], check=True, cwd=ROOT)
    out = subprocess.run(
        [sys.executable, "-c", RESTORE_PEAK, path, "restore", compression],
        check=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    result = json.loads(out.stdout)
    assert result["step"] == 1 and result["same"]
    extra = result["extra_peak"]
    assert extra < 4 * largest, f"restore added {extra / 2**20:.1f} MiB at peak for a 512 MiB model of 16 MiB tensors"


def test_restore_skips_a_checkpoint_damaged_in_a_part_it_does_not_restore(tmp_path: Path) -> None:
    model, optimizer = model_and_opt()
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, model=model, optimizer=optimizer)
        mgr.save(2, model=model, optimizer=optimizer)
    manifest = json.loads((tmp_path / "step-00000002" / "manifest.json").read_text())
    entry = next(t for t in manifest["tensors"] if t["name"].startswith("optimizer.state"))
    shard = tmp_path / "step-00000002" / entry["shard"]
    data = bytearray(shard.read_bytes())
    header = int.from_bytes(data[:8], "little") + 8
    data[header + entry["offsets"][0]] ^= 0x01  # the first byte of an optimizer moment
    shard.write_bytes(bytes(data))
    fresh, _ = model_and_opt(seed=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="Skipping checkpoint step 2"):
        record = torchkeep.CheckpointManager(tmp_path).restore(model=fresh)  # the optimizer is not asked for
    assert record is not None and record.step == 1
    assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in before.items())  # step 1 was loaded


def test_restore_lists_again_when_a_writer_deleted_every_listed_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with torchkeep.CheckpointManager(tmp_path) as writer:
        for step in (1, 2, 3):
            writer.save(step, state={"w": torch.full((2,), float(step))})
        stale = writer.list()
        for step in (1, 2, 3):
            writer.delete(step)
        writer.save(4, state={"w": torch.full((2,), 4.0)})
    reader = torchkeep.CheckpointManager(tmp_path)
    real, calls = reader.list, []
    monkeypatch.setattr(reader, "list", lambda: calls.append(1) or (stale if len(calls) == 1 else real()))
    state: dict[str, Any] = {}
    assert reader.restore(state=state).step == 4  # type: ignore[union-attr]
    assert torch.equal(state["w"], torch.full((2,), 4.0)) and len(calls) == 2
