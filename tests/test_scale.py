"""Correctness at scale: 100,000 tensors round-trip and verify, and one is found among them by load_into."""

from __future__ import annotations

from pathlib import Path

import torch

import torchkeep

COUNT = 100_000


def test_a_hundred_thousand_tensors_round_trip(tmp_path: Path) -> None:
    values = torch.arange(COUNT, dtype=torch.float32)
    state = {
        "model": {f"layer{i // 100}.p{i % 100}": values[i : i + 1].clone() for i in range(COUNT)},
        "step": 7,
    }
    torchkeep.save(state, tmp_path / "ckpt")
    loaded = torchkeep.load(tmp_path / "ckpt")
    assert loaded["step"] == 7 and list(loaded["model"]) == list(state["model"])
    assert torch.equal(torch.cat(list(loaded["model"].values())), values)
    report = torchkeep.verify(tmp_path / "ckpt")
    assert report.tensors == COUNT and report.method == "xxh3-64"
    assert len(torchkeep.inspect(tmp_path / "ckpt").tensors) == COUNT
    target = torch.nn.ParameterDict({"w": torch.zeros(1)})
    torchkeep.save({"w": torch.ones(1), **{f"x{i}": torch.ones(1) for i in range(COUNT)}}, tmp_path / "wide")
    report = torchkeep.load_into(target, tmp_path / "wide", strict=False)
    assert float(target["w"].detach()) == 1.0 and len(report.unexpected) == COUNT
