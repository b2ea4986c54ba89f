"""torchkeep.save: every leaf type and dtype round-trips bit-exactly in every format."""

from __future__ import annotations

import collections
import json
import os
import random
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch

import torchkeep
from tests.conftest import ALL_DTYPES, assert_same, random_tensor, train_state

FORMATS = ["ckpt", "ckpt.safetensors", "ckpt.pth"]


def every_leaf() -> dict[str, Any]:
    base = torch.randn(4, 6)
    return {
        "contiguous": torch.randn(3, 5),
        "transposed": base.t(),
        "strided_view": base[::2, 1::3],
        "scalar_tensor": torch.tensor(3.5),
        "empty": torch.empty(0, 7),
        "int": 7,
        "big_int": 2**100,
        "negative": -3,
        "float": 0.1,
        "neg_zero": -0.0,
        "inf": float("inf"),
        "ninf": float("-inf"),
        "nan": float("nan"),
        "bool": True,
        "none": None,
        "str": "héllo \u2603 \x00",
        "bytes": b"\x00\xffbytes",
        "dtype": torch.bfloat16,
        "device": torch.device("cuda", 1),
        "size": torch.Size([2, 3]),
        "tuple": (1, (2.0, "three"), []),
        "list": [1, [2, {"x": 3}]],
        "int_keys": {0: "a", 1: {2: "b"}},
        "ordered": collections.OrderedDict([("b", 1), ("a", 2)]),
        "param": torch.nn.Parameter(torch.ones(2)),
        "requires_grad": torch.zeros(3, requires_grad=True),
        "conj": torch.randn(3, dtype=torch.complex64).conj(),
    }


@pytest.mark.parametrize("name", FORMATS)
def test_every_leaf_type_round_trips(tmp_path: Any, name: str) -> None:
    state = every_leaf()
    torchkeep.save(state, tmp_path / name)
    loaded = torchkeep.load(tmp_path / name)
    assert_same(state, loaded)


@pytest.mark.parametrize("name", ["ckpt", "ckpt.safetensors"])
def test_numpy_values_round_trip(tmp_path: Any, name: str) -> None:
    state = {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "big_endian": np.arange(4, dtype=">i4"),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "strings": np.array(["ab", "cde"]),
        "datetimes": np.array(["2026-01-01"], dtype="datetime64[D]"),
        "scalar": np.float16(1.5),
        "int_scalar": np.int64(-4),
        "rng": np.random.default_rng(3).bit_generator.state,
        "legacy_rng": np.random.RandomState(4).get_state(),
    }
    torchkeep.save(state, tmp_path / name)
    assert_same(state, torchkeep.load(tmp_path / name))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("name", ["ckpt", "ckpt.safetensors"])
def test_every_torch_dtype_round_trips(tmp_path: Any, dtype: torch.dtype, name: str) -> None:
    state = {
        "matrix": random_tensor(dtype, (3, 5), seed=1),
        "scalar": random_tensor(dtype, (), seed=2),
        "empty": random_tensor(dtype, (0, 4), seed=3),
        "odd": random_tensor(dtype, (7,), seed=4),
    }
    torchkeep.save(state, tmp_path / name)
    assert_same(state, torchkeep.load(tmp_path / name))


@pytest.mark.parametrize("name", FORMATS)
def test_training_state_round_trips(tmp_path: Any, name: str) -> None:
    state = train_state()
    if name.endswith(".pth"):
        state["rng"].pop("numpy")  # torch.load(weights_only=True) cannot hold numpy arrays
    torchkeep.save(state, tmp_path / name)
    assert_same(state, torchkeep.load(tmp_path / name))


def test_python_and_torch_rng_states_restore_the_same_streams(tmp_path: Any) -> None:
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    torchkeep.save(rng, tmp_path / "rng")
    loaded = torchkeep.load(tmp_path / "rng")
    random.setstate(loaded["python"])
    np.random.set_state(loaded["numpy"])
    torch.set_rng_state(loaded["torch"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


OPTIMIZERS = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, amsgrad=True),
}


@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_optimizer_resumes_identically(tmp_path: Any, make_opt: Any) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = make_opt(model.parameters())
    x = torch.randn(8, 4)
    model(x).sum().backward()
    opt.step()
    torchkeep.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt")

    twin = torch.nn.Linear(4, 2)
    twin_opt = make_opt(twin.parameters())
    loaded = torchkeep.load(tmp_path / "ckpt")
    twin.load_state_dict(loaded["model"])
    twin_opt.load_state_dict(loaded["opt"])
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    assert torch.equal(model.weight, twin.weight)


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path: Any) -> None:
    emb = torch.nn.Embedding(100, 16)
    head = torch.nn.Linear(16, 100, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    state = model.state_dict(keep_vars=True)
    torchkeep.save(state, tmp_path / "ckpt")
    info = torchkeep.inspect(tmp_path / "ckpt")
    assert [t.name for t in info.tensors] == ["emb.weight"]
    loaded = torchkeep.load(tmp_path / "ckpt")
    assert loaded["head.weight"] is loaded["emb.weight"]
    assert isinstance(loaded["emb.weight"], torch.nn.Parameter)
    torchkeep.save(model.state_dict(), tmp_path / "tied.safetensors")
    assert safetensors.torch.load_file(tmp_path / "tied.safetensors").keys() == {"emb.weight"}


def test_distinct_views_of_one_storage_are_stored_separately(tmp_path: Any) -> None:
    base = torch.arange(10.0)
    state = {"a": base[:5], "b": base[5:]}
    torchkeep.save(state, tmp_path / "ckpt")
    assert_same(state, torchkeep.load(tmp_path / "ckpt"))
    assert torchkeep.inspect(tmp_path / "ckpt").nbytes == 40


def test_native_checkpoint_layout(tmp_path: Any) -> None:
    torchkeep.save({"w": torch.ones(2, 2), "step": 3}, tmp_path / "ckpt", metadata={"loss": 0.5})
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["data-00000.safetensors", "manifest.json"]
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["format"] == "torchkeep.checkpoint"
    assert manifest["format_version"] == 1
    assert manifest["metadata"] == {"loss": 0.5}
    assert set(manifest["provenance"]) == {"torchkeep", "torch", "numpy", "python"}
    (entry,) = manifest["tensors"]
    assert entry["dtype"] == "float32" and entry["shape"] == [2, 2] and len(entry["checksum"]) == 16
    assert manifest["tree"] == {"t": "dict", "items": [["w", {"t": "tensor", "name": "w"}], ["step", 3]]}
    # Any safetensors reader opens the shard.
    shard = safetensors.torch.load_file(tmp_path / "ckpt" / "data-00000.safetensors")
    assert torch.equal(shard["w"], torch.ones(2, 2))


def test_shards_are_split_by_size_and_readable_by_safetensors(tmp_path: Any) -> None:
    state = {f"t{i}": torch.full((256,), float(i)) for i in range(10)}
    torchkeep.save(state, tmp_path / "ckpt", max_shard_size=2048)
    shards = sorted(p for p in os.listdir(tmp_path / "ckpt") if p.endswith(".safetensors"))
    assert len(shards) == 5
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        merged.update(safetensors.torch.load_file(tmp_path / "ckpt" / shard))
    assert_same(state, {k: merged[k] for k in state})
    assert_same(state, torchkeep.load(tmp_path / "ckpt"))


def test_safetensors_file_opens_in_safetensors(tmp_path: Any) -> None:
    state = train_state()["model"]
    torchkeep.save(state, tmp_path / "model.safetensors", metadata={"arch": "mlp"})
    plain = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert_same(dict(state), {k: plain[k] for k in state})
    assert torchkeep.inspect(tmp_path / "model.safetensors").metadata == {"arch": "mlp"}


def test_pth_opens_with_plain_torch_load(tmp_path: Any) -> None:
    state = train_state()
    state["rng"].pop("numpy")
    torchkeep.save(state, tmp_path / "ckpt.pth")
    assert_same(state, torch.load(tmp_path / "ckpt.pth", weights_only=True))


def test_overwrite_replaces_whole_checkpoint(tmp_path: Any) -> None:
    torchkeep.save({"a": torch.ones(3), "b": torch.ones(3)}, tmp_path / "ckpt")
    torchkeep.save({"a": torch.zeros(2)}, tmp_path / "ckpt")
    assert_same({"a": torch.zeros(2)}, torchkeep.load(tmp_path / "ckpt"))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_save_to_memory_storage() -> None:
    storage = torchkeep.MemoryStorage()
    state = train_state()
    torchkeep.save(state, "run/step-1", storage=storage)
    assert storage.list("run") == ["step-1"]
    loaded = torchkeep.load("run/step-1", storage=storage)
    assert_same(state, loaded)
    loaded["model"]["0.weight"].add_(1)  # a loaded tensor is private: the stored bytes do not change
    assert_same(state, torchkeep.load("run/step-1", storage=storage))


def test_memory_url_round_trips() -> None:
    torchkeep.save({"x": torch.arange(3)}, "memory://tests-url/ckpt.safetensors")
    assert torch.equal(torchkeep.load("memory://tests-url/ckpt.safetensors")["x"], torch.arange(3))
