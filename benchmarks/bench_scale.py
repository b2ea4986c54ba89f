"""Many small tensors: torchkeep against torch.save and safetensors, side by side, cases interleaved.

Each point saves a state of N float32 tensors of 256 elements (1 KiB each) durably
(fsync included for every tool) and loads it back, touching every tensor once.
Prints seconds (median of --repeat) and torchkeep's ratio to the faster of the others.

    python benchmarks/bench_scale.py --counts 10 1000 10000
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchkeep
from benchmarks.common import fsync_path


def state_of(count: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(count)
    return {f"layers.{i // 8}.p{i % 8}": torch.randn(256, generator=g) for i in range(count)}


def touch(tree: dict[str, torch.Tensor]) -> float:
    return float(sum(float(t[0]) for t in tree.values()))


def torch_save(state: dict[str, torch.Tensor], path: str) -> None:
    torch.save(state, path)
    fsync_path(path)


def st_save(state: dict[str, torch.Tensor], path: str) -> None:
    save_file(state, path)
    fsync_path(path)


SAVES: dict[str, Callable[[dict[str, torch.Tensor], str], None]] = {
    "torchkeep": lambda s, p: torchkeep.save(s, p),
    "torch.save+fsync": torch_save,
    "safetensors+fsync": st_save,
}
LOADS: dict[str, Callable[[str], float]] = {
    "torchkeep": lambda p: touch(torchkeep.load(p)),
    "torch.load": lambda p: touch(torch.load(p, weights_only=True)),
    "safetensors": lambda p: touch(load_file(p)),
}
FILES = {"torchkeep": "tk", "torch.save+fsync": "ts.pt", "safetensors+fsync": "st.safetensors"}
LOAD_FILES = {"torchkeep": "tk", "torch.load": "ts.pt", "safetensors": "st.safetensors"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 1000, 10000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="tk-bench-scale-", dir=Path(__file__).resolve().parents[1])
    try:
        print(f"float32 tensors of 1 KiB; median of {args.repeat}; machine: {os.cpu_count()} cores")
        print(f"{'tensors':>8} {'case (save / load)':<34} {'save s':>8} {'load s':>8}")
        for count in args.counts:
            state = state_of(count)
            saves: dict[str, list[float]] = {name: [] for name in SAVES}
            loads: dict[str, list[float]] = {name: [] for name in LOADS}
            for _ in range(args.repeat):
                for name, save in SAVES.items():  # interleaved, so drift hits every case alike
                    path = os.path.join(root, FILES[name])
                    shutil.rmtree(path, ignore_errors=True)
                    if os.path.isfile(path):
                        os.remove(path)
                    start = time.perf_counter()
                    save(state, path)
                    saves[name].append(time.perf_counter() - start)
                for name, load in LOADS.items():
                    start = time.perf_counter()
                    load(os.path.join(root, LOAD_FILES[name]))
                    loads[name].append(time.perf_counter() - start)
            save_med = {k: statistics.median(v) for k, v in saves.items()}
            load_med = {k: statistics.median(v) for k, v in loads.items()}
            for (save_name, save_s), (load_name, load_s) in zip(save_med.items(), load_med.items(), strict=True):
                print(f"{count:>8} {save_name + ' / ' + load_name:<34} {save_s:8.3f} {load_s:8.3f}")
            best_save = min(v for k, v in save_med.items() if k != "torchkeep")
            best_load = min(v for k, v in load_med.items() if k != "torchkeep")
            print(
                f"{count:>8} torchkeep save / best other: {save_med['torchkeep'] / best_save:.2f}x; "
                f"load / best other: {load_med['torchkeep'] / best_load:.2f}x"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
