"""A writer killed with SIGKILL at any point leaves the previous checkpoint whole and nothing partial listed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import torchkeep
from torchkeep.storage import LocalStorage

ROOT = Path(__file__).resolve().parents[1]

# The child saves version 0, then starts saving version 1 and kills itself at
# the named point, exactly as a preempted machine would stop it.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import torch, torchkeep
    from torchkeep.storage import local
    from torchkeep import manifest as manifest_mod

    path, point = sys.argv[1], sys.argv[2]

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    def state(v):
        return {"w": torch.full((256, 1024), float(v)), "b": torch.full((7,), float(v)), "version": v}

    torchkeep.save(state(0), path, metadata={"version": 0})
    if point == "mid-shard":
        real = local._DurableFile.write
        def write(self, data):
            if len(memoryview(data)) > 4096:
                real(self, memoryview(data)[: len(memoryview(data)) // 2])
                die()
            return real(self, data)
        local._DurableFile.write = write
    elif point == "before-manifest":
        manifest_mod.Manifest.to_bytes = die
    elif point == "before-commit":
        local._LocalTransaction.commit = die
    elif point == "after-exchange":
        real_exchange = local._exchange
        def exchange(a, b):
            real_exchange(a, b)
            die()
        local._exchange = exchange
    elif point == "between-renames":
        local._exchange = lambda a, b: False
        real_rename = os.rename
        def rename(a, b):
            if ".tk-old-" not in str(b):
                die()
            real_rename(a, b)
        os.rename = rename
    torchkeep.save(state(1), path, metadata={"version": 1})
    print("finished")
    """
)


def run_child(path: Path, point: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(path), point],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


@pytest.mark.parametrize(
    "point", ["mid-shard", "before-manifest", "before-commit", "after-exchange", "between-renames"]
)
def test_killed_writer_leaves_a_whole_checkpoint(tmp_path: Path, point: str) -> None:
    path = tmp_path / "ckpt"
    result = run_child(path, point)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert LocalStorage(tmp_path).list() == ["ckpt"]  # nothing partial is listed
    torchkeep.verify(path)
    loaded = torchkeep.load(path)
    # Killed after the exchange, the new checkpoint is already the committed one.
    expected = 1 if point == "after-exchange" else 0
    assert loaded["version"] == expected
    assert torch.equal(loaded["w"], torch.full((256, 1024), float(expected)))
    # The next save removes whatever the dead writer left behind.
    torchkeep.save({"version": 2}, path)
    assert os.listdir(tmp_path) == ["ckpt"]
    assert torchkeep.load(path) == {"version": 2}


SOAK = textwrap.dedent(
    """
    import sys, torch, torchkeep
    path = sys.argv[1]
    v = 0
    while True:
        torchkeep.save({"w": torch.full((2048, 1024), float(v)), "version": v}, path)
        print(v, flush=True)
        v += 1
    """
)


def test_writer_killed_at_random_instants(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    rng = random.Random(0)
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", SOAK, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert proc.stdout is not None
        first = proc.stdout.readline()  # one save is committed
        assert first.strip().isdigit()
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        committed = [int(line) for line in [first, *out.splitlines()] if line.strip()]
        assert LocalStorage(tmp_path).list() == ["ckpt"]
        loaded = torchkeep.load(path)
        # The checkpoint is the last one reported committed, or the one after it
        # if the kill came between its commit and the report.
        assert loaded["version"] in (committed[-1], committed[-1] + 1)
        assert torch.equal(loaded["w"], torch.full((2048, 1024), float(loaded["version"])))
