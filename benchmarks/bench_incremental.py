"""Incremental checkpoints while fine-tuning: bytes written per checkpoint and disk used.

A model whose backbone (about 95% of the parameters) is frozen is fine-tuned,
and 10 checkpoints are saved by a CheckpointManager, plain and with
``incremental=True``, side by side in one run. A second part measures what
incremental saving costs when nothing can be shared (every tensor changes).

    python benchmarks/bench_incremental.py [--checkpoints N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

import torchkeep

MB = 1e6


def disk_usage(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    backbone = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(19)])
    head = nn.Linear(1024, 1024)
    for p in backbone.parameters():
        p.requires_grad_(False)
    model = nn.Sequential(backbone, head)
    return model, torch.optim.AdamW(head.parameters(), lr=1e-3)


def run(directory: str, checkpoints: int, incremental: bool, frozen: bool) -> tuple[list[int], list[float], int]:
    model, opt = model_and_optimizer()
    if not frozen:
        for p in model.parameters():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    written, seconds = [], []
    with torchkeep.CheckpointManager(directory, incremental=incremental) as mgr:
        for step in range(1, checkpoints + 1):
            x = torch.randn(32, 1024)
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            before = disk_usage(directory)
            start = time.perf_counter()
            mgr.save(step, model=model, optimizer=opt)
            seconds.append(time.perf_counter() - start)
            written.append(disk_usage(directory) - before)
    return written, seconds, disk_usage(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=10)
    args = parser.parse_args()
    model, _ = model_and_optimizer()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = tempfile.mkdtemp(prefix="tk-bench-", dir=Path(__file__).resolve().parents[1])
    try:
        results = {}
        for label, incremental, frozen in [
            ("plain, backbone frozen", False, True),
            ("incremental, backbone frozen", True, True),
            ("plain, everything trained", False, False),
            ("incremental, everything trained", True, False),
        ]:
            results[label] = run(os.path.join(base, label.replace(" ", "-").replace(",", "")), args.checkpoints,
                                 incremental, frozen)  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"model: {total * 4 / MB:.0f} MB of float32, {100 * (1 - trainable / total):.0f}% frozen; "
          f"{args.checkpoints} checkpoints; {os.cpu_count()} cores")  # fmt: skip
    print()
    print(f"{'run':<34}{'first MB':>10}{'later MB (median)':>19}{'disk MB':>10}{'save s (median)':>17}")
    for label, (written, seconds, disk) in results.items():
        print(
            f"{label:<34}{written[0] / MB:>10.1f}{statistics.median(written[1:]) / MB:>19.2f}"
            f"{disk / MB:>10.1f}{statistics.median(seconds):>17.3f}"
        )
    plain_first = results["plain, backbone frozen"][0][0]
    later = statistics.median(results["incremental, backbone frozen"][0][1:])
    cost = statistics.median(results["incremental, everything trained"][1]) / statistics.median(
        results["plain, everything trained"][1]
    )
    changed = 3 * trainable * 4  # the trained weights and AdamW's two moments change at every step
    print()
    print(f"incremental, later checkpoints: {100 * later / plain_first:.1f}% of a full checkpoint (target <= 6%)")
    print(
        f"what changes between checkpoints (trained weights + AdamW moments): {changed / MB:.2f} MB = "
        f"{100 * changed / plain_first:.1f}% of a full checkpoint; incremental wrote {later / changed:.2f}x that"
    )
    print(f"incremental save time when nothing is shared: {cost:.2f}x plain (on by default only if <= 1.10x)")


if __name__ == "__main__":
    main()
