"""Refusals name the place in the tree and leave nothing behind."""

from __future__ import annotations

import collections
import os
import warnings
from typing import Any

import numpy as np
import pytest
import torch

import torchkeep
from torchkeep.tree import decode_tree, encode_tree


class Thing:
    pass


Point = collections.namedtuple("Point", "x y")


def quantized() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates making quantized tensors
        return torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.qint8)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (Thing, "test_tree.Thing"),
        (lambda: lambda x: x, "a function"),
        (lambda: torch.randn(3, 3).to_sparse(), "sparse"),
        (quantized, "quantized"),
        (lambda: torch.empty(3, device="meta"), "meta device"),
        (lambda: Point(1, 2), "named tuple"),
        (lambda: {1, 2}, "builtins.set"),
        (lambda: 1 + 2j, "builtins.complex"),
        (lambda: np.array([object()]), "numpy"),
        (lambda: bytearray(b"x"), "bytearray"),
        (lambda: torch.nn.Linear(2, 2), "torch.nn.modules.linear.Linear"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
@pytest.mark.parametrize("name", ["ckpt", "ckpt.safetensors", "ckpt.pth"])
def test_unsupported_values_are_refused_with_their_place(tmp_path: Any, value: Any, fragment: str, name: str) -> None:
    state = {"optimizer": {"param_groups": [{"lr": 0.1, "foo": value()}]}}
    with pytest.raises(torchkeep.UnsupportedObjectError) as err:
        torchkeep.save(state, tmp_path / name)
    assert 'state["optimizer"]["param_groups"][0]["foo"]' in str(err.value)
    assert fragment in str(err.value)
    assert err.value.key == 'state["optimizer"]["param_groups"][0]["foo"]'
    assert isinstance(err.value, TypeError)
    assert os.listdir(tmp_path) == []


def test_bad_keys_and_cycles_are_refused(tmp_path: Any) -> None:
    with pytest.raises(torchkeep.UnsupportedObjectError, match="key"):
        torchkeep.save({(1, 2): 3}, tmp_path / "a")
    with pytest.raises(torchkeep.UnsupportedObjectError, match="key"):
        torchkeep.save({True: 3}, tmp_path / "a")
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(torchkeep.UnsupportedObjectError, match="cycle"):
        torchkeep.save({"x": loop}, tmp_path / "a")
    deep: Any = 0
    for _ in range(1000):
        deep = [deep]
    with pytest.raises(torchkeep.UnsupportedObjectError, match="deeper"):
        torchkeep.save(deep, tmp_path / "a")
    assert os.listdir(tmp_path) == []


def test_numpy_is_refused_for_pth_only(tmp_path: Any) -> None:
    with pytest.raises(torchkeep.UnsupportedObjectError, match="weights_only"):
        torchkeep.save({"a": np.zeros(2)}, tmp_path / "x.pth")
    torchkeep.save({"a": np.zeros(2)}, tmp_path / "x")


def test_bad_metadata_is_refused(tmp_path: Any) -> None:
    with pytest.raises(torchkeep.UnsupportedObjectError, match="metadata"):
        torchkeep.save({}, tmp_path / "a", metadata={"loss": float("nan")})
    with pytest.raises(torchkeep.UnsupportedObjectError, match="metadata"):
        torchkeep.save({}, tmp_path / "a", metadata={"t": torch.ones(1)})
    with pytest.raises(torchkeep.InvalidArgumentError, match="metadata"):
        torchkeep.save({}, tmp_path / "a.pth", metadata={"x": 1})
    assert os.listdir(tmp_path) == []


def test_encoding_is_plain_json_where_possible() -> None:
    node, leaves = encode_tree({"a": 1, "b": [2.5, "s", None, True], "c": (1,)})
    assert leaves == []
    assert node == {
        "t": "dict",
        "items": [
            ["a", 1],
            ["b", {"t": "list", "items": [2.5, "s", None, True]}],
            ["c", {"t": "tuple", "items": [1]}],
        ],
    }
    assert decode_tree(node, {}) == {"a": 1, "b": [2.5, "s", None, True], "c": (1,)}


def test_names_follow_tree_paths_and_never_collide() -> None:
    _, leaves = encode_tree({"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}, "l": [torch.ones(1)]})
    assert [leaf.name for leaf in leaves] == ["a.b", "a.b#2", "l.0"]
    _, leaves = encode_tree(torch.ones(2))
    assert [leaf.name for leaf in leaves] == ["tensor"]


def test_module_state_dict_versions_survive(tmp_path: Any) -> None:
    state = torch.nn.BatchNorm1d(3).state_dict()
    torchkeep.save(state, tmp_path / "bn")
    loaded = torchkeep.load(tmp_path / "bn")
    assert type(loaded) is collections.OrderedDict
    assert loaded._metadata == state._metadata  # type: ignore[attr-defined]
