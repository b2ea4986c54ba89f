"""Shared pieces of the benchmarks: a transformer-like state and memory readings from /proc."""

from __future__ import annotations

import os
import re

import torch
from torch import nn

GiB = 1024**3
MiB = 1024**2


def transformer_state(
    layers: int = 18, width: int = 1024, vocab: int = 32000, seed: int = 0
) -> dict[str, torch.Tensor]:
    """About 1 GiB of float32 weights laid out like a decoder-only transformer."""
    g = torch.Generator().manual_seed(seed)
    state = {"embed.weight": torch.randn(vocab, width, generator=g)}
    for i in range(layers):
        p = f"layers.{i}."
        for name in ("q", "k", "v", "o"):
            state[p + f"attn.{name}.weight"] = torch.randn(width, width, generator=g)
        state[p + "mlp.up.weight"] = torch.randn(4 * width, width, generator=g)
        state[p + "mlp.down.weight"] = torch.randn(width, 4 * width, generator=g)
        state[p + "norm1.weight"] = torch.ones(width)
        state[p + "norm2.weight"] = torch.ones(width)
    state["norm.weight"] = torch.ones(width)
    return state


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def status() -> dict[str, int]:
    """Memory figures of this process in bytes: RssAnon (private), RssFile, VmHWM (peak RSS)."""
    with open("/proc/self/status") as f:
        text = f.read()
    out = {}
    for field in ("RssAnon", "RssFile", "VmHWM", "VmRSS"):
        match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
        out[field] = int(match.group(1)) * 1024 if match else 0
    return out


def reset_peak() -> None:
    """Reset VmHWM to the current RSS, so the next reading is the peak of what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def fsync_path(path: str) -> None:
    if os.path.isdir(path):
        for name in os.listdir(path):
            fsync_path(os.path.join(path, name))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def module_for(state: dict[str, torch.Tensor]) -> nn.Module:
    """A module whose state_dict has exactly these names and shapes (zeros), to load into."""
    root = nn.Module()
    for name, value in state.items():
        *path, leaf = name.split(".")
        owner = root
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(leaf, nn.Parameter(torch.zeros_like(value), requires_grad=False))
    return root
