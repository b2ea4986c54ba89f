"""A small but complete training job for the resume tests: dropout, a shuffled loader,
an LR scheduler and AdamW, checkpointed by a CheckpointManager.

    python -m tests.train_script DIR TOTAL_STEPS [--kill-at STEP] [--sigterm-wait]

Prints one line per step, then the xxh3 fingerprint of the final weights.
"""

from __future__ import annotations

import argparse
import os
import signal
import time

import torch
import xxhash
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkeep


def fingerprint(model: nn.Module) -> str:
    h = xxhash.xxh3_64()
    for t in model.state_dict().values():
        h.update(t.contiguous().view(torch.uint8).numpy().data)
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("total", type=int)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--slow", action="store_true", help="sleep each step, so a signal can arrive")
    args = parser.parse_args()

    torch.manual_seed(1234)  # the run's own seeding; a resume must not depend on it
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(52, 6, generator=g), torch.randint(0, 3, (52,), generator=g))
    sampler = torchkeep.ResumableSampler(len(data), seed=7)
    loader = DataLoader(data, batch_size=8, sampler=sampler, generator=torch.Generator())
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.8)
    progress = {"seen": 0}

    manager = torchkeep.CheckpointManager(
        args.directory, keep_last=2, keep_best=1, monitor="loss", save_every=5, install_signal_handler=args.slow
    )
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "sampler": sampler, "progress": progress}
    record = manager.restore(**state)
    step = record.step if record else 0
    print(f"start {step}", flush=True)
    while step < args.total:
        for x, y in loader:
            model.train()
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            progress["seen"] += len(x)
            print(f"step {step} loss {loss.item():.6f}", flush=True)
            if step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if args.slow:
                time.sleep(0.05)
            if manager.should_save(step):
                manager.save(step, metrics={"loss": loss}, **state)
            if step >= args.total:
                break
    manager.close()
    print(f"seen {progress['seen']}")
    print(fingerprint(model))


if __name__ == "__main__":
    main()
