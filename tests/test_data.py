"""ResumableSampler: the same order from a seed, and the same next index after a restore."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

import torchkeep


def test_order_depends_only_on_seed_and_epoch() -> None:
    a, b = torchkeep.ResumableSampler(20, seed=3), torchkeep.ResumableSampler(20, seed=3)
    first = list(a)
    assert first == list(b) and sorted(first) == list(range(20))
    assert list(a) != first  # the next epoch is shuffled differently
    assert list(torchkeep.ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_restored_sampler_continues_mid_epoch() -> None:
    sampler = torchkeep.ResumableSampler(30, seed=1)
    loader = DataLoader(list(range(30)), batch_size=4, sampler=sampler, generator=torch.Generator())
    it = iter(loader)
    consumed = [next(it) for _ in range(3)]
    state = sampler.state_dict()
    assert state == {"epoch": 0, "position": 12, "seed": 1, "length": 30}
    rest = list(it) + list(loader)
    twin = torchkeep.ResumableSampler(30, seed=1)
    twin.load_state_dict(state)
    twin_loader = DataLoader(list(range(30)), batch_size=4, sampler=twin, generator=torch.Generator())
    resumed = list(twin_loader) + list(twin_loader)
    assert [t.tolist() for t in resumed] == [t.tolist() for t in rest]
    assert len(consumed) == 3


def test_mismatched_sampler_is_refused() -> None:
    with pytest.raises(torchkeep.InvalidArgumentError, match="seed"):
        torchkeep.ResumableSampler(10, seed=2).load_state_dict(torchkeep.ResumableSampler(10, seed=1).state_dict())
