"""Comparing the tensors of two state trees: what the registry's diff and the CLI's diff report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TensorChange", "compare_tensors", "flatten_tensors", "flatten_tree"]


_EXTRA_STATE = "_extra_state"  # the key torch gives what nn.Module.get_extra_state returns


def flatten_tree(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested state dict as ``{"a.b.c": leaf}`` (lists by index); a flat one comes back as it is.

    A module's extra state (``..._extra_state``, whatever ``get_extra_state``
    returned) is one leaf, as ``load_state_dict`` expects it.
    """
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            name = f"{prefix}{k}"
            if k == _EXTRA_STATE:
                out[name] = v
            elif isinstance(v, (dict, list, tuple)) and not isinstance(v, torch.Size):
                out.update(flatten_tree(v, name + "."))
            else:
                out[name] = v
        return out
    if isinstance(tree, (list, tuple)) and not isinstance(tree, torch.Size):
        return flatten_tree({str(i): v for i, v in enumerate(tree)}, prefix)
    return {prefix.rstrip(".") or "value": tree}


def flatten_tensors(tree: Any) -> dict[str, torch.Tensor]:
    """Every tensor in a tree by its dotted path (``model.0.weight``)."""
    return {k: v for k, v in flatten_tree(tree).items() if isinstance(v, torch.Tensor)}


@dataclass(frozen=True)
class TensorChange:
    """How one tensor present on both sides differs."""

    key: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    max_abs: float | None  # None when the shapes differ
    max_rel: float | None  # max |a-b| over max |a|, None when undefined


def compare_tensors(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]
) -> tuple[list[str], list[str], list[TensorChange]]:
    """Keys only in ``b`` (added), only in ``a`` (removed), and a change record for every shared key."""
    changes = []
    for key in a:
        if key not in b:
            continue
        x, y = a[key], b[key]
        max_abs = max_rel = None
        if x.shape == y.shape:
            if x.numel() == 0:
                max_abs, max_rel = 0.0, 0.0
            else:
                xd = x.detach().cpu().to(torch.complex128 if x.is_complex() or y.is_complex() else torch.float64)
                yd = y.detach().cpu().to(xd.dtype)
                max_abs = float((xd - yd).abs().max())
                scale = float(xd.abs().max())
                max_rel = max_abs / scale if scale else (0.0 if max_abs == 0 else float("inf"))
        changes.append(
            TensorChange(key, tuple(x.shape), tuple(y.shape), str(x.dtype).removeprefix("torch."),
                         str(y.dtype).removeprefix("torch."), max_abs, max_rel)
        )  # fmt: skip
    return [k for k in b if k not in a], [k for k in a if k not in b], changes
