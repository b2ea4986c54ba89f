"""A reader in another process while a writer re-saves or deletes the same checkpoint."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep

ROOT = Path(__file__).resolve().parents[1]

WRITER = textwrap.dedent(
    """
    import shutil, sys, torch, torchkeep
    path, mode, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    for i in range(1, rounds + 1):
        state = {"a": torch.full((64, 64), float(i)), "b": torch.full((3000,), float(i))}
        if mode == "delete" and i % 2 == 0:
            torchkeep.CheckpointManager(path.rsplit("/", 1)[0]).delete(1)
            continue
        if mode == "delete":
            with torchkeep.CheckpointManager(path.rsplit("/", 1)[0]) as mgr:
                mgr.save(1, a=state["a"], b=state["b"])
        else:
            torchkeep.save(state, path, max_shard_size=20_000)  # several shards, so old and new can mix
        if i == 1:
            print("first", flush=True)
    """
)


def consistent(values: list[Any]) -> bool:
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    first = tensors[0].reshape(-1)[0]
    return len(tensors) == 2 and all(bool((v == first).all()) for v in tensors)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["replace", "delete"])
def test_a_reader_never_reports_damage_that_a_writer_caused(tmp_path: Path, mode: str) -> None:
    path = str(tmp_path / ("ckpt" if mode == "replace" else "step-00000001"))
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, path, mode, "120"], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    seen: dict[str, int] = {}
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "first"
        reads = 0
        while writer.poll() is None or reads < 20:
            reads += 1
            model = nn.Linear(64, 64, bias=False)
            calls: dict[str, Any] = {
                "load": lambda: list(torchkeep.load(path).values()),
                "copy": lambda: list(torchkeep.load(path, mmap=False).values()),
                "verify": lambda: torchkeep.verify(path),
                "inspect": lambda: torchkeep.inspect(path),
                "load_into": lambda m=model: torchkeep.load_into(
                    m, path, rename={"a": "weight"}, strict=False, on_mismatch="skip"
                ),
            }
            for name, call in calls.items():
                try:
                    result = call()
                except torchkeep.CheckpointNotFoundError:
                    seen["not found"] = seen.get("not found", 0) + 1
                    continue
                seen[name] = seen.get(name, 0) + 1
                if name in ("load", "copy"):
                    assert consistent(result), f"{name} returned tensors of two different saves"
    finally:
        writer.kill()
        writer.communicate()
    assert seen.get("load", 0) > 0 and seen.get("verify", 0) > 0
    if mode == "delete":
        assert seen.get("not found", 0) > 0
