"""Retention policies as tables of fake records: no I/O."""

from __future__ import annotations

import math

import pytest

import torchkeep
from torchkeep.retention import (
    AnyOf,
    CheckpointRecord,
    KeepBest,
    KeepEvery,
    KeepInterval,
    KeepLast,
    best_record,
    steps_to_delete,
)


def records(*rows: tuple[int, float | None, float]) -> list[CheckpointRecord]:
    """(step, loss or None, created seconds) rows."""
    return [
        CheckpointRecord(step=s, path=f"step-{s}", metrics={} if loss is None else {"loss": loss}, created=t)
        for s, loss, t in rows
    ]


RUN = records((10, 0.9, 0), (20, 0.5, 60), (30, 0.7, 120), (40, float("nan"), 3700), (50, 0.6, 3800), (60, None, 7300))


@pytest.mark.parametrize(
    ("policy", "kept"),
    [
        (KeepLast(1), {60}),
        (KeepLast(3), {40, 50, 60}),
        (KeepLast(100), {10, 20, 30, 40, 50, 60}),
        (KeepBest(1, "loss", "min"), {20}),
        (KeepBest(2, "loss", "min"), {20, 50}),
        (KeepBest(2, "loss", "max"), {10, 30}),
        (KeepEvery(20), {20, 40, 60}),
        (KeepEvery(25), {50}),
        (KeepInterval(3600), {10, 40, 60}),
        (KeepInterval(1), {10, 20, 30, 40, 50, 60}),
        (AnyOf(KeepLast(1), KeepBest(1, "loss")), {20, 60}),
        (AnyOf(), set()),
    ],
    ids=repr,
)
def test_policy_keeps(policy: torchkeep.RetentionPolicy, kept: set[int]) -> None:
    assert policy.keep(RUN) == kept
    assert isinstance(policy, torchkeep.RetentionPolicy)


@pytest.mark.parametrize(
    ("policy", "monitor", "deleted"),
    [
        (KeepLast(1), None, [10, 20, 30, 40, 50]),
        (KeepLast(1), "loss", [10, 30, 40, 50]),  # the best (20) is never deleted
        (KeepBest(1, "loss"), "loss", [10, 30, 40, 50]),  # nor the newest (60)
        (AnyOf(KeepLast(3), KeepBest(1, "loss")), "loss", [10, 30]),
        (None, "loss", []),
    ],
)
def test_steps_to_delete_protect_newest_and_best(policy: object, monitor: str | None, deleted: list[int]) -> None:
    assert steps_to_delete(RUN, policy, monitor=monitor, mode="min") == deleted  # type: ignore[arg-type]


def test_best_ignores_nan_and_absent_and_prefers_newest_on_ties() -> None:
    tied = records((1, 0.5, 0), (2, 0.5, 1), (3, float("nan"), 2), (4, None, 3))
    best = best_record(tied, "loss", "min")
    assert best is not None and best.step == 2
    assert best_record(records((1, None, 0)), "loss", "min") is None
    assert best_record(records((1, -math.inf, 0), (2, 0.0, 1)), "loss", "min").step == 1  # type: ignore[union-attr]


def test_policies_validate_their_options() -> None:
    for make in (lambda: KeepLast(0), lambda: KeepEvery(-1), lambda: KeepInterval(0), lambda: KeepBest(0, "x")):
        with pytest.raises(torchkeep.InvalidArgumentError):
            make()
    with pytest.raises(torchkeep.InvalidArgumentError, match="mode"):
        KeepBest(1, "loss", "up")  # type: ignore[arg-type]
