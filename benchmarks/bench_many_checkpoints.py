"""Many checkpoints in one CheckpointManager directory: the cost of the next save, and of a fresh list().

Directories holding 3, 300 and 1,000 committed checkpoints (each 3 tensors of 4
float32) are built by saving through a manager that keeps everything
(``keep_every=1``). Then one manager per directory, held open as in training,
saves the next step into each, the three cases interleaved; the median of
--repeat saves is printed per directory. Last, a new process lists the largest
directory with ``CheckpointManager(d).list()`` (nothing cached in the process;
the page cache is warm), timed without the imports.

    python benchmarks/bench_many_checkpoints.py [--counts 3 300 1000] [--repeat 15]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchkeep

ROOT = Path(__file__).resolve().parents[1]
STATE: dict[str, Any] = {"a": torch.zeros(4), "b": torch.ones(4), "c": torch.arange(4.0)}

FRESH_LIST = """
import sys, time
import torchkeep.manager
start = time.perf_counter()
records = torchkeep.CheckpointManager(sys.argv[1]).list()
print(len(records), time.perf_counter() - start)
"""


def build(directory: str, count: int) -> None:
    with torchkeep.CheckpointManager(directory, keep_every=1, rng=False) as mgr:
        for step in range(1, count + 1):
            mgr.save(step, metrics={"loss": 1.0 / step}, w=STATE)


def fresh_list(directory: str) -> tuple[int, float]:
    command = [sys.executable, "-c", FRESH_LIST, directory]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)  # this checkout's torchkeep
    count, seconds = out.stdout.split()
    return int(count), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[3, 300, 1000])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="tk-bench-many-", dir=ROOT)
    try:
        directories = {count: os.path.join(root, f"run-{count}") for count in args.counts}
        for count, directory in directories.items():
            start = time.perf_counter()
            build(directory, count)
            print(f"built {count:>5} checkpoints in {time.perf_counter() - start:6.2f} s")
        managers = {
            count: torchkeep.CheckpointManager(directory, keep_every=1, rng=False)
            for count, directory in directories.items()
        }
        for count, mgr in managers.items():
            mgr.save(count + 1, metrics={"loss": 0.5}, w=STATE)  # the first save reads every manifest once
        seconds: dict[int, list[float]] = {count: [] for count in args.counts}
        for i in range(args.repeat):
            for count, mgr in managers.items():  # interleaved, so drift hits every case alike
                start = time.perf_counter()
                mgr.save(count + 2 + i, metrics={"loss": 0.5}, w=STATE)
                seconds[count].append(time.perf_counter() - start)
        for mgr in managers.values():
            mgr.close()
        base = statistics.median(seconds[args.counts[0]])
        print(f"one save into a directory of N checkpoints, median of {args.repeat}; {os.cpu_count()} cores")
        print(f"{'N':>6} {'save ms':>8} {'vs N=' + str(args.counts[0]):>8}")
        for count in args.counts:
            median = statistics.median(seconds[count])
            print(f"{count:>6} {median * 1e3:8.2f} {median / base:7.2f}x")
        largest = max(args.counts)
        lists = [fresh_list(directories[largest]) for _ in range(3)]
        listed = lists[0][0]
        median = statistics.median(s for _, s in lists)
        print(f"fresh list() of {listed} checkpoints in a new process: {median:.3f} s (median of 3, imports excluded)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
