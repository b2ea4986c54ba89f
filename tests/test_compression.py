"""zstd-compressed native checkpoints: bit-exact, checked, independent per tensor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import torchkeep
from tests.conftest import ALL_DTYPES, assert_same, random_tensor, train_state


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_round_trips_compressed(tmp_path: Path, dtype: torch.dtype) -> None:
    state = {
        "matrix": random_tensor(dtype, (33, 7), seed=1),
        "scalar": random_tensor(dtype, (), seed=2),
        "empty": random_tensor(dtype, (0, 4), seed=3),
    }
    torchkeep.save(state, tmp_path / "ckpt", compression="zstd")
    assert_same(state, torchkeep.load(tmp_path / "ckpt"))


@pytest.mark.parametrize("compression", ["zstd", "zstd:1", "zstd:19", torchkeep.Compression(level=5, shuffle=False)])
def test_training_state_compressed(tmp_path: Path, compression: Any) -> None:
    state = train_state()
    state["array"] = np.arange(10.0)
    torchkeep.save(state, tmp_path / "ckpt", compression=compression)
    assert_same(state, torchkeep.load(tmp_path / "ckpt"))
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    assert manifest["shards"][0]["compression"] == "zstd"
    shuffled = [t["shuffle"] for t in manifest["tensors"] if "shuffle" in t]
    assert bool(shuffled) == (not isinstance(compression, torchkeep.Compression))
    assert torchkeep.verify(tmp_path / "ckpt").method == "xxh3-64"


def test_compression_shrinks_compressible_data(tmp_path: Path) -> None:
    state = {"mostly_zero": torch.zeros(256, 1024), "ones": torch.ones(1024, dtype=torch.bfloat16)}
    state["mostly_zero"][::97] = 1.0
    torchkeep.save(state, tmp_path / "plain")
    torchkeep.save(state, tmp_path / "small", compression="zstd")
    plain = sum(f.stat().st_size for f in (tmp_path / "plain").iterdir())
    small = sum(f.stat().st_size for f in (tmp_path / "small").iterdir())
    assert small * 20 < plain


def test_damaged_compressed_data_is_caught(tmp_path: Path) -> None:
    state = {"a": torch.randn(64, 64), "b": torch.randn(64, 64)}
    torchkeep.save(state, tmp_path / "ckpt", compression="zstd")
    shard = tmp_path / "ckpt" / "data-00000.zst"
    good = shard.read_bytes()
    for offset in (10, len(good) // 2, len(good) - 3):
        data = bytearray(good)
        data[offset] ^= 0x55
        shard.write_bytes(bytes(data))
        with pytest.raises(torchkeep.CorruptCheckpointError):
            torchkeep.load(tmp_path / "ckpt")
    shard.write_bytes(good[:-100])
    with pytest.raises(torchkeep.CorruptCheckpointError):
        torchkeep.load(tmp_path / "ckpt")


def test_one_tensor_reads_without_the_others(tmp_path: Path) -> None:
    state = {"first": torch.randn(128), "second": torch.randn(128)}
    torchkeep.save(state, tmp_path / "ckpt", compression="zstd")
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    first = next(t for t in manifest["tensors"] if t["name"] == "first")
    shard = tmp_path / "ckpt" / "data-00000.zst"
    data = bytearray(shard.read_bytes())
    data[first["offsets"][1] - 2] ^= 0xFF  # damage only the first tensor's frame
    shard.write_bytes(bytes(data))
    from torchkeep.formats import open_checkpoint
    from torchkeep.formats.source import ManifestSource
    from torchkeep.storage import LocalStorage

    source = open_checkpoint(LocalStorage(tmp_path), "ckpt")
    assert isinstance(source, ManifestSource)
    arrays, _ = source.read_arrays(verify=True, names={"second"})
    assert torch.equal(arrays["second"], state["second"])


def test_load_into_and_manager_with_compression(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16))
    with torchkeep.CheckpointManager(tmp_path / "run", compression="zstd", keep_last=2) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, model=model)
        twin = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16))
        assert mgr.restore(model=twin).step == 3  # type: ignore[union-attr]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True))
    half = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16)).to(torch.bfloat16)
    report = torchkeep.load_into(half, tmp_path / "run" / "step-00000003", key="model")
    assert report.ok and torch.equal(half[0].weight, model[0].weight.to(torch.bfloat16))
    fresh = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16))
    torchkeep.load_into(fresh, tmp_path / "run" / "step-00000003", key="model")
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_compression_options_are_checked(tmp_path: Path) -> None:
    for bad in ("gzip", "zstd:x", "zstd:99", 3):
        with pytest.raises(torchkeep.InvalidArgumentError):
            torchkeep.save({"w": torch.ones(2)}, tmp_path / "c", compression=bad)  # type: ignore[arg-type]
    with pytest.raises(torchkeep.InvalidArgumentError, match="native checkpoints"):
        torchkeep.save({"w": torch.ones(2)}, tmp_path / "c.safetensors", compression="zstd")
    assert list(tmp_path.iterdir()) == []
