"""torchkeep demo: real training, checkpoints, a crash, an exact resume, and damage caught.

1. Train a small network for 300 steps without interruption: the reference.
2. Train it again in a child process that saves a checkpoint every 25 steps
   (model, optimizer, LR scheduler, RNG streams, step) and is killed with
   SIGKILL part-way through a save, as a preempted machine would be.
3. Resume from the newest checkpoint that verifies and finish the run: the
   weights are bit-for-bit those of the reference.
4. Flip one byte in the newest checkpoint: verify names the damaged tensor,
   and the resume falls back to the checkpoint before it.

Run with ``make demo``; everything is written under ./demo-run.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torchkeep  # noqa: E402

RUN = ROOT / "demo-run"
STEPS = 300
SAVE_EVERY = 25


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(32, 256), nn.GELU(), nn.Dropout(0.1),
        nn.Linear(256, 256), nn.GELU(), nn.Dropout(0.1),
        nn.Linear(256, 10),
    )  # fmt: skip


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic synthetic classification batch for each step (the data position is the step)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(64, 32, generator=g)
    y = (x[:, :10].argmax(dim=1) + (x[:, 10] > 0).long()) % 10
    return x, y


class Trainer:
    """Everything a run needs to continue exactly: model, optimizer, scheduler, RNG, step."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        self.model = make_model()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-3, weight_decay=0.01)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=STEPS)
        self.step = 0

    def train_step(self) -> float:
        self.model.train()
        x, y = batch(self.step)
        loss = nn.functional.cross_entropy(self.model(x), y)  # dropout draws from the global RNG
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return loss.item()

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
            "step": self.step,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        self.step = state["step"]


def checkpoints() -> list[Path]:
    """Committed checkpoints, newest first, ordered by step number (never by file time)."""
    found = [p for p in (RUN / "ckpt").glob("step-*") if not p.name.startswith(".")]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def newest_good() -> Path | None:
    for path in checkpoints():
        try:
            torchkeep.verify(path)
            return path
        except torchkeep.TorchkeepError as err:
            print(f"   skipping {path.name}: {type(err).__name__}: {err}")
    return None


def child_train(kill_at: int) -> None:
    """Train from scratch, checkpointing; kill ourselves in the middle of the save at step ``kill_at``."""
    trainer = Trainer()
    while trainer.step < STEPS:
        loss = trainer.train_step()
        if trainer.step % SAVE_EVERY == 0:
            path = RUN / "ckpt" / f"step-{trainer.step:05d}"
            if trainer.step == kill_at:
                from torchkeep.storage import local

                real_write = local._DurableFile.write

                def write_then_die(self: Any, data: Any, real_write: Any = real_write) -> int:
                    real_write(self, memoryview(data)[: len(memoryview(data)) // 2])
                    os.kill(os.getpid(), signal.SIGKILL)  # preempted half-way through the shard
                    return 0

                local._DurableFile.write = write_then_die  # type: ignore[method-assign]
            torchkeep.save(trainer.state(), path, metadata={"loss": loss})
            print(f"   step {trainer.step:3d}  loss {loss:.4f}  saved {path.name}", flush=True)


def fingerprint(model: nn.Module) -> str:
    import xxhash

    h = xxhash.xxh3_64()
    for t in model.state_dict().values():
        h.update(t.contiguous().view(torch.uint8).numpy().data)
    return h.hexdigest()


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_train(int(sys.argv[2]))
        return
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir()

    print(f"1. Reference run: {STEPS} steps without interruption")
    reference = Trainer()
    while reference.step < STEPS:
        loss = reference.train_step()
    print(f"   final loss {loss:.4f}, weights {fingerprint(reference.model)}")

    kill_at = 175
    print(f"\n2. Checkpointed run, killed with SIGKILL while saving step {kill_at}")
    proc = subprocess.run([sys.executable, __file__, "--child", str(kill_at)], cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, f"the child should have been killed, got {proc.returncode}"
    leftovers = sorted(p.name for p in (RUN / "ckpt").iterdir() if p.name.startswith("."))
    print(f"   killed. On disk: {[p.name for p in checkpoints()][:3]}... plus staging {leftovers}")
    print(f"   no step-{kill_at:05d} was published: the interrupted save stays invisible")

    print("\n3. Resume from the newest checkpoint that verifies")
    t0 = time.perf_counter()
    good = newest_good()
    assert good is not None
    resumed = Trainer()
    resumed.restore(torchkeep.load(good))
    print(f"   restored {good.name} (step {resumed.step}) in {time.perf_counter() - t0:.3f}s")
    while resumed.step < STEPS:
        loss = resumed.train_step()
    same = fingerprint(resumed.model) == fingerprint(reference.model)
    print(f"   final loss {loss:.4f}, weights {fingerprint(resumed.model)}")
    print(f"   bit-for-bit identical to the reference: {same}")
    assert same, "the resumed run diverged from the reference"
    torchkeep.save(resumed.state(), RUN / "ckpt" / f"step-{STEPS:05d}", metadata={"loss": loss})
    print(f"   saved step-{STEPS:05d}; the next save cleaned the dead writer's staging:", end=" ")
    print(not any(p.name.startswith(".") for p in (RUN / "ckpt").iterdir()))

    newest = checkpoints()[0]
    print(f"\n4. Flip one byte in {newest.name} and verify")
    shard = newest / "data-00000.safetensors"
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)  # inside a weight matrix
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    try:
        torchkeep.verify(newest)
        raise AssertionError("the flipped byte went unnoticed")
    except torchkeep.ChecksumMismatchError as err:
        print(f"   verify: {err}")
    fallback = newest_good()
    assert fallback is not None and fallback != newest
    print(f"   resume would fall back to {fallback.name}")
    info = torchkeep.inspect(fallback)
    print(
        f"\n   inspect {fallback.name}: {len(info.tensors)} tensors, "
        f"{info.nbytes / 1024:.0f} KiB, metadata {info.metadata}"
    )
    print("\nDemo finished: crash-safe saves, exact resume, damage detected.")


if __name__ == "__main__":
    main()
