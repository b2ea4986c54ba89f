"""One opener per format: what each returns, and that every read entry point goes through it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import torchkeep
from torchkeep import formats
from torchkeep.cli import main
from torchkeep.formats import OPENERS, Format, open_checkpoint
from torchkeep.formats.fileset import seal_folder
from torchkeep.formats.source import ManifestSource, StoredTensor, TorchFileSource
from torchkeep.formats.streaming import CopyJob
from torchkeep.manifest import TensorEntry
from torchkeep.storage import LocalStorage

STATE = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(4, dtype=torch.bfloat16)}


def write(tmp_path: Path, fmt: Format) -> str:
    """A checkpoint of ``STATE`` in ``fmt``; returns its path."""
    if fmt is Format.NATIVE:
        torchkeep.save(STATE, tmp_path / "ckpt")
        return str(tmp_path / "ckpt")
    if fmt is Format.SAFETENSORS:
        save_file(STATE, str(tmp_path / "foreign.safetensors"))
        return str(tmp_path / "foreign.safetensors")
    if fmt is Format.SAFETENSORS_SHARDED:
        folder = tmp_path / "hub"
        folder.mkdir()
        save_file({"w": STATE["w"]}, str(folder / "model-1.safetensors"))
        save_file({"b": STATE["b"]}, str(folder / "model-2.safetensors"))
        index = {"weight_map": {"w": "model-1.safetensors", "b": "model-2.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        return str(folder)
    if fmt is Format.FILESET:  # the sharded model above beside an engine's other files, sealed
        path = write(tmp_path, Format.SAFETENSORS_SHARDED)
        torch.save({"step": 1}, Path(path) / "optimizer.pt")
        seal_folder(path, engine="test-engine")
        return path
    if fmt is Format.TORCH_ZIP:
        torch.save(STATE, tmp_path / "zip.pth")
        return str(tmp_path / "zip.pth")
    torch.save(STATE, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    return str(tmp_path / "legacy.pt")


def test_every_format_has_one_opener() -> None:
    assert set(OPENERS) == set(Format)


@pytest.mark.parametrize("fmt", list(Format))
def test_each_opener_lists_and_streams_its_tensors(tmp_path: Path, fmt: Format) -> None:
    path = write(tmp_path, fmt)
    source = open_checkpoint(LocalStorage(tmp_path), Path(path).name)
    assert source.format is fmt
    assert sorted(source.top_level_names() or []) == ["b", "w"]
    info = source.info()
    assert {t.name.rsplit(".", 1)[-1]: (t.dtype, t.shape) for t in info.tensors} == {
        "w": ("float32", (3, 4)),
        "b": ("bfloat16", (4,)),
    }
    tree = source.placeholder_tree()
    dest = {name: torch.zeros_like(value) for name, value in STATE.items()}
    if isinstance(source, ManifestSource):
        assert all(isinstance(tree[name], TensorEntry) for name in STATE)
        jobs = [CopyJob(source.stored[tree[name].name], dest[name], name) for name in STATE]
        assert all(isinstance(job.source, StoredTensor) for job in jobs)
    else:
        assert isinstance(source, TorchFileSource)
        jobs = [CopyJob(tree[name], dest[name], name) for name in STATE]
    assert source.stream_into(jobs, verify=True) == set()
    for name, value in STATE.items():
        assert torch.equal(dest[name], value)
    assert source.check().tensors == 2


def test_a_damaged_tensor_is_named_by_the_stream(tmp_path: Path) -> None:
    torchkeep.save(STATE, tmp_path / "ckpt")
    source = open_checkpoint(LocalStorage(tmp_path), "ckpt")
    assert isinstance(source, ManifestSource)
    stored = source.stored["w"]
    shard = Path(tmp_path / "ckpt" / stored.entry.shard)
    data = bytearray(shard.read_bytes())
    data[stored.start] ^= 0x01
    shard.write_bytes(bytes(data))
    dest = torch.zeros(3, 4)
    assert source.stream_into([CopyJob(stored, dest, "w")], verify=True) == {"w"}
    assert source.stream_into([CopyJob(stored, dest, "w")], verify=False) == set()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)


ENTRY_POINTS: dict[str, Callable[[Path], Any]] = {
    "load": lambda p: torchkeep.load(p / "ckpt"),
    "inspect": lambda p: torchkeep.inspect(p / "ckpt"),
    "verify": lambda p: torchkeep.verify(p / "ckpt"),
    "load_into": lambda p: torchkeep.load_into(Net(), p / "ckpt", key="model"),
    "load_into optimizer": lambda p: torchkeep.load_into(
        torch.optim.SGD(Net().parameters(), lr=0.1), p / "ckpt", key="optimizer"
    ),
    "restore": lambda p: torchkeep.CheckpointManager(p / "run").restore(model=Net()),
    "registry": lambda p: torchkeep.Registry(p / "reg").load_into(Net(), "m", key="model"),
    "cli inspect": lambda p: main(["inspect", str(p / "ckpt")]),
    "cli verify": lambda p: main(["verify", str(p / "ckpt")]),
    "cli diff": lambda p: main(["diff", str(p / "ckpt"), str(p / "ckpt")]),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_read_entry_point_goes_through_the_opener(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str
) -> None:
    net = Net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    state = {"model": net.state_dict(), "optimizer": optimizer.state_dict()}
    torchkeep.save(state, tmp_path / "ckpt")
    with torchkeep.CheckpointManager(tmp_path / "run", rng=False) as mgr:
        mgr.save(1, model=net)
    torchkeep.Registry(tmp_path / "reg").register("m", tmp_path / "ckpt")
    calls: list[str] = []
    real = OPENERS[Format.NATIVE]

    def spy(storage: Any, key: str) -> Any:
        calls.append(key)
        return real(storage, key)

    monkeypatch.setitem(formats.OPENERS, Format.NATIVE, spy)
    result = ENTRY_POINTS[entry](tmp_path)
    assert result not in (1, 2), f"{entry} failed"  # the CLI's exit status
    assert calls, f"{entry} read the checkpoint without the native opener"


def test_a_checkpoint_deleted_while_it_is_read_is_not_found_not_damaged(tmp_path: Path) -> None:
    import shutil

    from torchkeep.formats import read_consistently

    torchkeep.save(STATE, tmp_path / "ckpt")

    def deleted_midway(source: Any) -> Any:
        shutil.rmtree(tmp_path / "ckpt")  # a writer's retention, between the manifest and the data
        raise torchkeep.CorruptCheckpointError("a shard is missing", path=str(tmp_path / "ckpt"))

    with pytest.raises(torchkeep.CheckpointNotFoundError, match="was deleted while it was being read"):
        read_consistently(LocalStorage(tmp_path), "ckpt", deleted_midway)
