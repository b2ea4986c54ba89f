"""The copy engine: small tensors out of a mapped shard, large ones read in pieces, both checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep.formats import streaming


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.small = nn.Parameter(torch.zeros(16))  # 64 bytes: copied out of the mapped shard
        self.large = nn.Parameter(torch.zeros(512, 1024))  # 2 MiB: read with preadv in pieces


def saved(tmp_path: Path) -> tuple[Mixed, Path]:
    source = Mixed()
    with torch.no_grad():
        source.small.copy_(torch.arange(16.0))
        source.large.copy_(torch.randn(512, 1024))
    torchkeep.save(source.state_dict(), tmp_path / "ckpt")
    return source, tmp_path / "ckpt"


def flip(path: Path, tensor: str) -> None:
    shard = path / "data-00000.safetensors"
    data = bytearray(shard.read_bytes())
    length = int.from_bytes(data[:8], "little")
    begin = json.loads(data[8 : 8 + length])[tensor]["data_offsets"][0]
    data[8 + length + begin + 1] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_small_and_large_tensors_arrive_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, path = saved(tmp_path)
    reads: list[int] = []
    original = streaming._read_direct
    monkeypatch.setattr(streaming, "_read_direct", lambda s, j, v: reads.append(j.dest.nbytes) or original(s, j, v))
    target = Mixed()
    torchkeep.load_into(target, path)
    assert torch.equal(target.small, source.small) and torch.equal(target.large, source.large)
    assert reads == [512 * 1024 * 4]  # only the large one is read in pieces


def test_a_damaged_small_tensor_leaves_its_destination_untouched(tmp_path: Path) -> None:
    _, path = saved(tmp_path)
    flip(path, "small")
    target = Mixed()
    with torch.no_grad():
        target.small.fill_(7.0)
    with pytest.raises(torchkeep.ChecksumMismatchError) as err:
        torchkeep.load_into(target, path)
    assert err.value.damaged == ["small"]
    assert torch.equal(target.small, torch.full((16,), 7.0))


def test_a_damaged_large_tensor_is_named(tmp_path: Path) -> None:
    _, path = saved(tmp_path)
    flip(path, "large")
    with pytest.raises(torchkeep.ChecksumMismatchError) as err:
        torchkeep.load_into(Mixed(), path)
    assert err.value.damaged == ["large"]


def test_many_small_tensors_map_each_shard_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {f"p{i}": torch.full((8,), float(i)) for i in range(300)}
    torchkeep.save(state, tmp_path / "ckpt")
    target = nn.ParameterDict({k: torch.zeros(8) for k in state})
    calls = {"map": 0, "read_into": 0}
    from torchkeep.storage.local import LocalStorage

    for name in calls:
        original = getattr(LocalStorage, name)

        def counted(self: object, *args: object, _name: str = name, _original: object = original) -> object:
            calls[_name] += 1
            return _original(self, *args)  # type: ignore[operator]

        monkeypatch.setattr(LocalStorage, name, counted)
    torchkeep.load_into(target, tmp_path / "ckpt")
    assert all(torch.equal(target[k], state[k]) for k in state)
    assert calls == {"map": 1, "read_into": 0}
