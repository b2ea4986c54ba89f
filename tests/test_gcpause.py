"""The cycle collector is paused only for the block, and a program's own setting is kept."""

from __future__ import annotations

import gc

import pytest
import torch

import torchkeep
from torchkeep.gcpause import paused_gc


def test_collector_is_restored_after_the_block_even_on_error() -> None:
    assert gc.isenabled()
    with pytest.raises(ZeroDivisionError), paused_gc():
        assert not gc.isenabled()
        _ = 1 / 0
    assert gc.isenabled()


def test_a_program_that_disabled_the_collector_keeps_it_disabled(tmp_path: object) -> None:
    gc.disable()
    try:
        torchkeep.save({"w": torch.ones(2)}, f"{tmp_path}/ckpt")
        torchkeep.load(f"{tmp_path}/ckpt")
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_loads_and_saves_leave_the_collector_on(tmp_path: object) -> None:
    torchkeep.save({"w": torch.ones(2)}, f"{tmp_path}/ckpt")
    assert gc.isenabled()
    with pytest.raises(torchkeep.CheckpointNotFoundError):
        torchkeep.load(f"{tmp_path}/missing")
    torchkeep.load(f"{tmp_path}/ckpt")
    assert gc.isenabled()
