"""What a new user hits: each everyday mistake gets a clear error or a warning, never silence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torchkeep


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("gzip", "unknown codec 'gzip'"),
        ("lz4", "unknown codec 'lz4'"),
        ("zstd:99", "from 1 to 22, not 99"),
        ("zstd:0", "from 1 to 22, not 0"),
        ("zstd:fast", "must be an integer from 1 to 22"),
        ("zstd:-3", "must be an integer from 1 to 22"),
    ],
)
def test_compression_messages_name_the_actual_problem(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(torchkeep.InvalidArgumentError, match=message):
        torchkeep.save({"w": torch.ones(2)}, tmp_path / "ckpt", compression=value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pt", ".pth", ".BIN"])
def test_torch_suffixes_save_a_torch_zip(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    torchkeep.save({"w": torch.arange(3.0)}, path)
    assert path.is_file()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3.0))
    assert torchkeep.inspect(path).format == "torch-zip"


@pytest.mark.parametrize("name", ["weights.json", "model.pkl", "state.npz", "x.tar"])
def test_other_suffixes_are_refused_with_the_list(tmp_path: Path, name: str) -> None:
    with pytest.raises(torchkeep.InvalidArgumentError, match=r"NAME\.safetensors, NAME\.pth, NAME\.pt, NAME\.bin"):
        torchkeep.save({"w": torch.ones(1)}, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["step-3", "run.2", "epoch-3.5", "v1.0.0"])
def test_names_without_a_file_suffix_are_native_directories(tmp_path: Path, name: str) -> None:
    torchkeep.save({"w": torch.ones(1)}, tmp_path / name)
    assert (tmp_path / name / "manifest.json").is_file()
