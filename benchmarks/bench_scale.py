"""Many tensors: torchkeep against torch.save, safetensors, side by side, cases interleaved.

Two shapes of state at each count N:

- ``small``: N float32 tensors of 256 elements (1 KiB each);
- ``mixed``: N/4 blocks of a d x d weight and three d-vectors (a linear layer,
  its bias and a norm), d chosen so the state is about 256 MiB in all: the
  size spread of a real model, from a few hundred bytes to megabytes.

Each point saves durably (fsync included for every tool), loads back touching
every tensor once, and loads into an existing module (``load_into`` against
``safetensors.torch.load_model``). Prints seconds (median of --repeat),
torchkeep's ratio to the faster of the others, and each tool's extra private
memory at its peak during save and load (RssAnon growth, sampled every 2 ms;
tensors mapped from the page cache are not private).

    python benchmarks/bench_scale.py --counts 10 1000 10000 100000 --shapes small mixed
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchkeep
from benchmarks.common import MiB, fsync_path, module_for, status

MIXED_BYTES = 256 * MiB


def state_of(count: int, shape: str = "small") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(count)
    if shape == "small":
        return {f"layers.{i // 8}.p{i % 8}": torch.randn(256, generator=g) for i in range(count)}
    blocks = max(1, count // 4)
    width = max(4, int((MIXED_BYTES / 4 / blocks) ** 0.5))
    state = {}
    for b in range(blocks):
        state[f"blocks.{b}.linear.weight"] = torch.randn(width, width, generator=g)
        state[f"blocks.{b}.linear.bias"] = torch.randn(width, generator=g)
        state[f"blocks.{b}.norm.weight"] = torch.randn(width, generator=g)
        state[f"blocks.{b}.norm.bias"] = torch.randn(width, generator=g)
    return state


def touch(tree: dict[str, torch.Tensor]) -> float:
    return float(sum(float(t.reshape(-1)[0]) for t in tree.values()))


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
INTO: dict[str, Callable[[nn.Module, str], Any]] = {
    "torchkeep load_into": lambda m, p: torchkeep.load_into(m, p),
    "safetensors load_model": lambda m, p: load_model(m, p),
}
FILES = {"torchkeep": "tk", "torch.save+fsync": "ts.pt", "safetensors+fsync": "st.safetensors"}
LOAD_FILES = {"torchkeep": "tk", "torch.load": "ts.pt", "safetensors": "st.safetensors"}
INTO_FILES = {"torchkeep load_into": "tk", "safetensors load_model": "st.safetensors"}


class PrivatePeak:
    """The largest growth of this process's private memory while the block runs, sampled every 2 ms."""

    def __enter__(self) -> PrivatePeak:
        self.base = status()["RssAnon"]
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, status()["RssAnon"] - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status()["RssAnon"] - self.base)


def timed(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if os.path.isfile(path):
        os.remove(path)


def point(root: str, count: int, shape: str, repeat: int) -> None:
    state = state_of(count, shape)
    model = module_for(state)
    saves: dict[str, list[float]] = {name: [] for name in SAVES}
    loads: dict[str, list[float]] = {name: [] for name in LOADS}
    intos: dict[str, list[float]] = {name: [] for name in INTO}
    for _ in range(repeat):  # interleaved, so drift hits every case alike
        for name, save in SAVES.items():
            path = os.path.join(root, FILES[name])
            remove(path)
            saves[name].append(timed(lambda save=save, path=path: save(state, path)))  # type: ignore[misc]
        for name, load in LOADS.items():
            path = os.path.join(root, LOAD_FILES[name])
            loads[name].append(timed(lambda load=load, path=path: load(path)))  # type: ignore[misc]
        for name, into in INTO.items():
            path = os.path.join(root, INTO_FILES[name])
            intos[name].append(timed(lambda into=into, path=path: into(model, path)))  # type: ignore[misc]
    saving, loading = {}, {}
    for name, save in SAVES.items():
        path = os.path.join(root, FILES[name])
        remove(path)
        with PrivatePeak() as peak:
            save(state, path)
        saving[name] = peak.peak
    for name, load in LOADS.items():
        with PrivatePeak() as peak:
            load(os.path.join(root, LOAD_FILES[name]))
        loading[name] = peak.peak
    total = sum(t.nbytes for t in state.values())
    med = {k: statistics.median(v) for k, v in {**saves, **loads, **intos}.items() if k != "torchkeep"}
    tk_save, tk_load = statistics.median(saves["torchkeep"]), statistics.median(loads["torchkeep"])
    best_save = min(med[k] for k in SAVES if k != "torchkeep")
    best_load = min(med[k] for k in LOADS if k != "torchkeep")
    into_ratio = med["torchkeep load_into"] / med["safetensors load_model"]
    print(
        f"{shape:>6} {len(state):>7} {total / MiB:8.1f} | save {tk_save:7.3f} {best_save:7.3f} "
        f"{tk_save / best_save:5.2f}x | load {tk_load:7.3f} {best_load:7.3f} {tk_load / best_load:5.2f}x | "
        f"into {med['torchkeep load_into']:7.3f} {med['safetensors load_model']:7.3f} {into_ratio:5.2f}x | "
        f"private MiB save {'/'.join(f'{v / MiB:.0f}' for v in saving.values())} "
        f"load {'/'.join(f'{v / MiB:.0f}' for v in loading.values())}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 1000, 10000, 100000])
    parser.add_argument("--shapes", nargs="+", default=["small", "mixed"], choices=["small", "mixed"])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="tk-bench-scale-", dir=Path(__file__).resolve().parents[1])
    try:
        print(f"median of {args.repeat}; machine: {os.cpu_count()} cores; seconds: torchkeep, best other, ratio")
        print(f"{'shape':>6} {'tensors':>7} {'MiB':>8} | save (vs torch.save/safetensors + fsync) | load "
              "(vs torch.load/safetensors) | into (vs load_model) | private peak: torchkeep/torch/st")  # fmt: skip
        for shape in args.shapes:
            for count in args.counts:
                point(root, count, shape, args.repeat)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
