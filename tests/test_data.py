"""ResumableSampler: the same order from a seed, and the same next index after a restore."""

from __future__ import annotations

from typing import Any

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


# --- DataLoader workers draw indices ahead of the loop: the position must count what the loop received ---


def _loader(sampler: torchkeep.ResumableSampler, workers: int, **kwargs: Any) -> DataLoader[int]:
    kwargs.setdefault("batch_size", 4)
    return DataLoader(
        list(range(sampler.length)), sampler=sampler, num_workers=workers, generator=torch.Generator(), **kwargs
    )


def _train(
    sampler: torchkeep.ResumableSampler, loader: DataLoader[int], steps: int, *, save_at: int = -1, track: bool = True
) -> tuple[list[int], dict[str, Any] | None]:
    """Trains over epochs: the sample ids of ``steps`` batches, and the state saved in the loop body at ``save_at``."""
    seen: list[int] = []
    saved = None
    step = 0
    for _ in range(steps + 1):  # epochs; bounded, so a sampler stuck in one epoch fails instead of hanging
        for batch in sampler.track(loader) if track else loader:
            seen += batch.tolist()
            step += 1
            if step == save_at:
                saved = sampler.state_dict()
            if step >= steps:
                return seen, saved
    raise AssertionError(f"{steps + 1} epochs gave only {step} of {steps} batches")


def _resumed_run(length: int, workers: int, cut: int, steps: int, **kwargs: Any) -> tuple[list[int], dict[str, Any]]:
    """Trains ``cut`` steps, saves in the loop body and dies; a fresh sampler and loader run the rest."""
    first = torchkeep.ResumableSampler(length, seed=5)
    before, state = _train(first, _loader(first, workers, **kwargs), cut, save_at=cut)
    assert state is not None
    fresh = torchkeep.ResumableSampler(length, seed=5)
    fresh.load_state_dict(state)
    after, _ = _train(fresh, _loader(fresh, workers, **kwargs), steps - cut)
    return before + after, state


def _uninterrupted(length: int, steps: int, **kwargs: Any) -> list[int]:
    sampler = torchkeep.ResumableSampler(length, seed=5)
    return _train(sampler, _loader(sampler, 0, **kwargs), steps, track=False)[0]


@pytest.mark.parametrize("cut", [1, 3, 9])
def test_worker_loader_resumes_at_the_first_sample_the_loop_did_not_receive(cut: int) -> None:
    # 30 items in batches of 4: 8 batches an epoch. Two workers prefetch 4 batches at iter(), and one more
    # after each batch received, so by batch 3 the sampler has handed out 28 indices; by batch 9 (the first
    # of epoch 1) it has finished epoch 0 and started epoch 1.
    expected = _uninterrupted(30, 20)
    uninterrupted = torchkeep.ResumableSampler(30, seed=5)
    assert _train(uninterrupted, _loader(uninterrupted, 2), 20)[0] == expected
    resumed, state = _resumed_run(30, 2, cut, 20)
    assert resumed == expected
    assert (state["epoch"], state["position"]) == {1: (0, 4), 3: (0, 12), 9: (1, 4)}[cut]


def test_untracked_worker_loader_refuses_to_record_a_position() -> None:
    sampler = torchkeep.ResumableSampler(30, seed=5)
    it = iter(_loader(sampler, 2))
    next(it)
    with pytest.raises(
        torchkeep.InvalidArgumentError,
        match=r"^A DataLoader with worker processes draws indices ahead of training, so this position would skip "
        r"samples on resume: iterate the loader through sampler\.track\(loader\)\.$",
    ):
        sampler.state_dict()
    del it
    sampler.load_state_dict({"epoch": 2, "position": 8, "seed": 5, "length": 30})  # a restore starts clean
    assert sampler.state_dict()["position"] == 8


def test_track_refuses_loaders_it_cannot_count() -> None:
    sampler = torchkeep.ResumableSampler(8)
    with pytest.raises(torchkeep.InvalidArgumentError, match=r"the DataLoader this sampler feeds"):
        sampler.track(_loader(torchkeep.ResumableSampler(8), 0))
    with pytest.raises(torchkeep.InvalidArgumentError, match=r"in_order=True"):
        sampler.track(_loader(sampler, 2, in_order=False))

    class OwnState(DataLoader[int]):
        def state_dict(self) -> dict[str, Any]:
            return {}

    own = OwnState(list(range(8)), batch_size=4, sampler=sampler)
    with pytest.raises(torchkeep.InvalidArgumentError, match=r"^OwnState records the sampler's position itself"):
        sampler.track(own)


@pytest.mark.parametrize("persistent", [False, True])
def test_leaving_a_tracked_loop_early_loses_no_prefetched_sample(persistent: bool) -> None:
    sampler = torchkeep.ResumableSampler(30, seed=5)
    tracked = sampler.track(_loader(sampler, 2, persistent_workers=persistent))
    seen: list[int] = []
    for _ in range(2):  # e.g. stop for an evaluation every 3 batches, then carry on
        for i, batch in enumerate(tracked):
            seen += batch.tolist()
            if i == 2:
                break
    assert len(tracked) == 8
    assert seen == _uninterrupted(30, 6)


def test_single_process_loader_position_is_unchanged_by_tracking() -> None:
    # Without workers the loader takes indices only when the loop asks for a batch: tracked or not,
    # the state after every batch is the same.
    plain, tracked = torchkeep.ResumableSampler(32, seed=5), torchkeep.ResumableSampler(32, seed=5)
    plain_it, tracked_it = iter(_loader(plain, 0)), iter(tracked.track(_loader(tracked, 0)))
    for step in range(1, 9):
        assert next(plain_it).tolist() == next(tracked_it).tolist()
        assert plain.state_dict() == tracked.state_dict() == {"epoch": 0, "position": 4 * step, "seed": 5, "length": 32}
    for it in (plain_it, tracked_it):
        with pytest.raises(StopIteration):
            next(it)
    assert plain.state_dict() == tracked.state_dict() == {"epoch": 1, "position": 0, "seed": 5, "length": 32}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(("drop_last", "last_position"), [(False, 10), (True, 8)])
def test_resume_at_the_end_of_an_epoch(workers: int, drop_last: bool, last_position: int) -> None:
    # 10 items in batches of 4: batches of 4, 4, 2 (drop_last=False) or 4, 4 and 2 dropped (drop_last=True).
    per_epoch = 2 if drop_last else 3
    expected = _uninterrupted(10, 4 * per_epoch, drop_last=drop_last)
    # Saved in the loop body, on the epoch's last batch: the epoch is not over yet.
    resumed, state = _resumed_run(10, workers, per_epoch, 4 * per_epoch, drop_last=drop_last)
    assert resumed == expected
    assert (state["epoch"], state["position"]) == (0, last_position)
    # Saved between epochs, after the loop ended: the next epoch starts from its first sample.
    sampler = torchkeep.ResumableSampler(10, seed=5)
    tracked = sampler.track(_loader(sampler, workers, drop_last=drop_last))
    first = [i for batch in tracked for i in batch.tolist()]
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (1, 0)
    fresh = torchkeep.ResumableSampler(10, seed=5)
    fresh.load_state_dict(state)
    rest, _ = _train(fresh, _loader(fresh, workers, drop_last=drop_last), 3 * per_epoch)
    assert first + rest == expected


def test_in_a_distributed_job_each_rank_takes_its_own_equal_share_of_every_epoch() -> None:
    shares = [torchkeep.ResumableSampler(10, seed=4, num_replicas=3, rank=r) for r in range(3)]
    drawn = [list(s) for s in shares]
    assert [len(d) for d in drawn] == [3, 3, 3] and [len(s) for s in shares] == [3, 3, 3]
    assert len(set().union(*map(set, drawn))) == 9  # disjoint; one index of ten is left out this epoch
    whole = list(torchkeep.ResumableSampler(10, seed=4))
    assert drawn[1] == whole[1:9:3]  # every third of the epoch's order, from the rank's place
    # Each rank's position is its own, and restores only into the same share.
    sampler = torchkeep.ResumableSampler(10, seed=4, num_replicas=3, rank=1)
    it = iter(sampler)
    first = next(it)
    state = sampler.state_dict()
    again = torchkeep.ResumableSampler(10, seed=4, num_replicas=3, rank=1)
    again.load_state_dict(state)
    assert first == drawn[1][0] and list(again) == drawn[1][1:]
    with pytest.raises(torchkeep.InvalidArgumentError, match="rank 2 of 3"):
        torchkeep.ResumableSampler(10, seed=4, num_replicas=3, rank=2).load_state_dict(state)


def test_a_distributed_sampler_keeps_its_epoch_per_rank() -> None:
    from torch.utils.data import DistributedSampler

    from torchkeep.distributed import is_per_rank, load_rank_state, rank_state

    sampler = DistributedSampler(range(8), num_replicas=2, rank=1)
    sampler.set_epoch(5)
    assert is_per_rank(sampler) and rank_state("data", sampler) == {"epoch": 5}
    fresh = DistributedSampler(range(8), num_replicas=2, rank=1)
    load_rank_state(fresh, {"epoch": 5})
    assert list(fresh) == list(sampler)


def test_a_dataset_smaller_than_the_ranks_is_refused() -> None:
    with pytest.raises(torchkeep.InvalidArgumentError, match="3 items cannot be shared by 4 ranks"):
        torchkeep.ResumableSampler(3, num_replicas=4, rank=0)
