"""A registry with many versions: register with 1 vs 1,000 existing versions, and search over 10,000.

Registering is timed into two registries side by side, one holding 1 version of the model and
one holding 1,000, interleaved so both see the same disk, and the median of several is printed
with how many manifests each registration read. Search is timed over 10 models of 1,000
versions each (10,000 in all), answered from the index.

The large registries are built quickly: each version is saved exactly as ``register`` saves it
(the same checkpoint and registry record), into memory, and the files are then written out
without an fsync each; the index is built from them once.

    python benchmarks/bench_registry_scale.py [--rounds N] [--search-models M]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import torchkeep
import torchkeep.registry as registry_module
from tests.registry_data import write_versions


class ManifestReads:
    """Counts the manifests the registry reads."""

    def __init__(self) -> None:
        self.count = 0
        self._real = registry_module.read_manifest

    def __enter__(self) -> ManifestReads:
        def counting(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return self._real(*args, **kwargs)

        registry_module.read_manifest = counting  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        registry_module.read_manifest = self._real  # type: ignore[assignment]


def bench_register(workdir: Path, rounds: int) -> None:
    registries = {}
    for existing in (1, 1000):
        root = workdir / f"register-{existing}"
        write_versions(root, "m", existing, lambda v: {"accuracy": v / 1000})
        registries[existing] = torchkeep.Registry(root)  # builds the index from the files once
    times: dict[int, list[float]] = {1: [], 1000: []}
    reads: dict[int, list[int]] = {1: [], 1000: []}
    for i in range(rounds):
        for existing, registry in registries.items():
            with ManifestReads() as counter:
                start = time.perf_counter()
                registry.register("m", {"w": torch.full((4,), float(i))}, metadata={"accuracy": 0.5})
                times[existing].append(time.perf_counter() - start)
            reads[existing].append(counter.count)
    one, many = statistics.median(times[1]), statistics.median(times[1000])
    print(f"register, median of {rounds} (interleaved):")
    print(f"  1 existing version:      {one * 1e3:7.2f} ms  ({statistics.median(reads[1]):.0f} manifest reads)")
    print(f"  1,000 existing versions: {many * 1e3:7.2f} ms  ({statistics.median(reads[1000]):.0f} manifest reads)")
    print(f"  ratio: {many / one:.2f}x  (goal <= 1.5x)")


def bench_search(workdir: Path, models: int, rounds: int) -> None:
    root = workdir / "search"
    for m in range(models):
        write_versions(root, f"m{m}", 1000, lambda v: {
            "accuracy": ((v * 7919) % 1000) / 1000, "dataset": f"d{v % 10}", "epoch": v})  # fmt: skip
    start = time.perf_counter()
    registry = torchkeep.Registry(root)
    print(f"search over {models * 1000:,} versions (index built once in {time.perf_counter() - start:.1f} s):")
    queries: list[tuple[str, Callable[[], list[torchkeep.ModelVersion]]]] = [
        ("accuracy >= 0.998", lambda: registry.search(where={"accuracy": (">=", 0.998)})),
        ("dataset = d3, accuracy > 0.99", lambda: registry.search(where={"dataset": "d3", "accuracy": (">", 0.99)})),
        ("one model, epoch = 500", lambda: registry.search("m0", where={"epoch": 500})),
        ("top 10 by accuracy, no filter", lambda: registry.search(order_by="accuracy", limit=10)),
    ]
    for label, query in queries:
        times = []
        with ManifestReads() as counter:
            for _ in range(rounds):
                start = time.perf_counter()
                found = query()
                times.append(time.perf_counter() - start)
        print(f"  {label:32s} {statistics.median(times) * 1e3:7.2f} ms  "
              f"({len(found)} found, {counter.count} manifest reads; goal < 50 ms)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--search-models", type=int, default=10, help="models of 1,000 versions each")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench_register(Path(tmp), args.rounds)
        bench_search(Path(tmp), args.search_models, args.rounds)


if __name__ == "__main__":
    main()
