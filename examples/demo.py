"""torchkeep demo: real training with a CheckpointManager, a SIGKILL, an exact resume, damage caught.

1. Train a small classifier for 300 steps without interruption: the reference.
2. Train it again in a child process with a CheckpointManager (a checkpoint every
   25 steps, keeping the newest 3 and the best by validation loss); at step 160
   the child is killed with SIGKILL (it sends the signal to itself, so the point
   is the same on every machine), as a preemption or the OOM killer would.
3. Resume in a fresh process-state from the newest checkpoint: model, AdamW,
   LR schedule, RNG streams and the data loader's position all come back, and
   the final weights equal the reference bit for bit.
4. Flip one byte in the newest checkpoint: restore notices, says why, and
   falls back to the one before.

Run with ``make demo``; everything is written under ./demo-run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torchkeep  # noqa: E402

# Everything goes under ./demo-run of the repository, or the folder given with --dir.
RUN = Path(sys.argv[sys.argv.index("--dir") + 1]).resolve() if "--dir" in sys.argv else ROOT / "demo-run"
CKPT = RUN / "ckpt"
STEPS = 300
KILL_AT = 160


def make_data() -> tuple[TensorDataset, tuple[torch.Tensor, torch.Tensor]]:
    """A synthetic 10-class problem, made the same way every time."""
    g = torch.Generator().manual_seed(2026)
    x = torch.randn(2048 + 512, 32, generator=g)
    y = (x[:, :10].argmax(dim=1) + (x[:, 10] > 0).long()) % 10
    return TensorDataset(x[:2048], y[:2048]), (x[2048:], y[2048:])


def fingerprint(model: nn.Module) -> str:
    h = xxhash.xxh3_64()
    for t in model.state_dict().values():
        h.update(t.contiguous().view(torch.uint8).numpy().data)
    return h.hexdigest()


def train(steps: int, *, manager: torchkeep.CheckpointManager | None = None, kill_at: int | None = None) -> nn.Module:
    torch.manual_seed(0)  # the run's initial seed; a resume takes the RNG state from the checkpoint instead
    train_set, (val_x, val_y) = make_data()
    sampler = torchkeep.ResumableSampler(len(train_set), seed=1)
    loader = DataLoader(train_set, batch_size=64, sampler=sampler, generator=torch.Generator())
    model = nn.Sequential(
        nn.Linear(32, 256), nn.GELU(), nn.Dropout(0.1),
        nn.Linear(256, 256), nn.GELU(), nn.Dropout(0.1),
        nn.Linear(256, 10),
    )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "data": sampler}

    step = 0
    if manager is not None:
        record = manager.restore(**state)  # None on a fresh start
        if record is not None:
            step = record.step
            print(f"   resumed from step {step} (val_loss {record.metrics['val_loss']:.4f})", flush=True)
    while step < steps:
        for x, y in loader:
            model.train()
            loss = nn.functional.cross_entropy(model(x), y)  # dropout draws from the global RNG
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step == kill_at:
                print(
                    f"   step {step:3d}  killed with SIGKILL (the work since step {step - step % 25} is lost)",
                    flush=True,
                )
                os.kill(os.getpid(), signal.SIGKILL)  # as a preemption or the OOM killer would
            if manager is not None and manager.should_save(step):
                model.eval()
                with torch.no_grad():
                    val_loss = nn.functional.cross_entropy(model(val_x), val_y).item()
                manager.save(step, metrics={"loss": loss, "val_loss": val_loss}, **state)
                print(f"   step {step:3d}  loss {loss.item():.4f}  val_loss {val_loss:.4f}  saved", flush=True)
            if step >= steps:
                break
    return model


def open_manager() -> torchkeep.CheckpointManager:
    return torchkeep.CheckpointManager(CKPT, keep_last=3, keep_best=1, monitor="val_loss", save_every=25)


def show(manager: torchkeep.CheckpointManager) -> None:
    best = manager.best()
    print(f"   {'step':>6}  {'loss':>8}  {'val_loss':>8}  {'size':>8}  written")
    for r in manager.list():
        mark = "  <- best" if best is not None and r.step == best.step else ""
        when = time.strftime("%H:%M:%S", time.localtime(r.created))
        print(
            f"   {r.step:>6}  {r.metrics['loss']:>8.4f}  {r.metrics['val_loss']:>8.4f}  "
            f"{r.size / 1024:>5.0f} KiB  {when}{mark}"
        )


def main() -> None:
    if "--child" in sys.argv:
        with open_manager() as manager:
            train(STEPS, manager=manager, kill_at=KILL_AT)
        return
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir()
    start = time.perf_counter()

    print(f"1. Reference: {STEPS} steps without interruption")
    reference = fingerprint(train(STEPS))
    print(f"   final weights {reference}")

    print(f"\n2. The same run in a child process with a CheckpointManager, killed at step {KILL_AT}")
    child = subprocess.run([sys.executable, __file__, "--child", "--dir", str(RUN)])
    assert child.returncode == -signal.SIGKILL, f"the child should have been killed, got {child.returncode}"
    print(f"   the child died (exit {child.returncode}); on disk:")
    with open_manager() as manager:
        show(manager)

    print("\n3. Resume: restore() picks the newest checkpoint that verifies")
    with open_manager() as manager:
        resumed = fingerprint(train(STEPS, manager=manager))
        print(f"   final weights {resumed}")
        print(f"   bit-for-bit identical to the reference: {resumed == reference}")
        assert resumed == reference, "the resumed run diverged from the reference"
        print("\n   Checkpoints kept (newest 3 + best by val_loss):")
        show(manager)

        newest = manager.latest()
        assert newest is not None
        print(f"\n4. Flip one byte in the middle of step {newest.step}'s data, then restore")
        shard = Path(newest.path) / "data-00000.safetensors"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            record = manager.restore(model=nn.Sequential(
                nn.Linear(32, 256), nn.GELU(), nn.Dropout(0.1),
                nn.Linear(256, 256), nn.GELU(), nn.Dropout(0.1),
                nn.Linear(256, 10),
            ))  # fmt: skip
        for w in caught:
            print(f"   warning: {w.message}")
        assert record is not None and record.step != newest.step
        print(f"   restored step {record.step} instead")
    print(f"\nDemo finished in {time.perf_counter() - start:.0f}s: crash-safe saves, exact resume, damage caught.")


if __name__ == "__main__":
    main()
