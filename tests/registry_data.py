"""Registry versions written straight to disk, as ``register`` stores them, for tests and benchmarks at scale."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import torchkeep


def write_versions(root: Path, name: str, count: int, metadata: Callable[[int], dict[str, Any]]) -> None:
    """Store versions 1..count of ``name`` under ``root`` as ``register`` would, without updating the index."""
    memory = torchkeep.MemoryStorage()
    for version in range(1, count + 1):
        record = {"name": name, "version": version, "created": "2024-01-01T00:00:00Z",
                  "metadata": metadata(version), "tags": [], "description": None,
                  "lineage": {"source": "state_dict"}}  # fmt: skip
        key = f"models/{name}/v{version}"
        torchkeep.save({"w": torch.full((2,), float(version))}, key, storage=memory, metadata={"registry": record})
        os.makedirs(root / key, exist_ok=True)
        for file in memory.list(key):
            (root / key / file).write_bytes(memory.read(f"{key}/{file}"))
        memory.delete(key)
