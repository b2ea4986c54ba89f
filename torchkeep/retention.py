"""Which checkpoints to keep: small pure policies over checkpoint records, no I/O.

A policy looks at the committed checkpoints, oldest first, and answers which
steps it wants kept. A manager keeps the union of its policies' answers plus,
always, the newest checkpoint and the best one, and deletes the rest only
after the new checkpoint is committed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from torchkeep.errors import InvalidArgumentError

__all__ = [
    "AnyOf",
    "CheckpointRecord",
    "KeepBest",
    "KeepEvery",
    "KeepInterval",
    "KeepLast",
    "RetentionPolicy",
    "best_record",
    "steps_to_delete",
]


@dataclass(frozen=True)
class CheckpointRecord:
    """One committed checkpoint of a manager's directory.

    Attributes:
        step: the training step it was saved at.
        path: where it is (a path or URL).
        metrics: the metrics given to ``save``.
        metadata: the metadata given to ``save``.
        created: when it was written, seconds since the epoch (UTC).
        size: bytes of tensor data files.
    """

    step: int
    path: str
    metrics: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    size: int = 0


@runtime_checkable
class RetentionPolicy(Protocol):
    """Answers which steps to keep, given every committed record ordered by step."""

    def keep(self, records: Sequence[CheckpointRecord]) -> set[int]: ...


def positive_count(name: str, value: object) -> None:
    """Refuse anything but a positive int (a bool, a float such as 2.5 or inf, a numpy value, a string)."""
    if type(value) is not int or value <= 0:
        raise InvalidArgumentError(f"{name} must be a positive int, not {value!r}.")


def positive_seconds(name: str, value: object) -> None:
    """Refuse anything but a positive, finite number of seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidArgumentError(f"{name} must be a positive, finite number of seconds, not {value!r}.")


@dataclass(frozen=True)
class KeepLast:
    """Keep the ``n`` newest checkpoints."""

    n: int

    def __post_init__(self) -> None:
        positive_count("KeepLast.n", self.n)

    def keep(self, records: Sequence[CheckpointRecord]) -> set[int]:
        return {r.step for r in sorted(records, key=lambda r: r.step)[-self.n :]}


def _score(record: CheckpointRecord, monitor: str, mode: str) -> float | None:
    value = record.metrics.get(monitor)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return None
    return float(value) if mode == "min" else -float(value)


def best_record(records: Sequence[CheckpointRecord], monitor: str, mode: str) -> CheckpointRecord | None:
    """The record with the best ``monitor`` metric; the newest wins a tie; NaN and absent never win."""
    scored = [(s, -r.step, r) for r in records if (s := _score(r, monitor, mode)) is not None]
    return min(scored, key=lambda t: (t[0], t[1]))[2] if scored else None


@dataclass(frozen=True)
class KeepBest:
    """Keep the ``k`` checkpoints with the best ``monitor`` metric (``mode`` "min" or "max")."""

    k: int
    monitor: str
    mode: Literal["min", "max"] = "min"

    def __post_init__(self) -> None:
        positive_count("KeepBest.k", self.k)
        if not isinstance(self.monitor, str) or not self.monitor:
            raise InvalidArgumentError(f"KeepBest.monitor must be a metric name, not {self.monitor!r}.")
        if self.mode not in ("min", "max"):
            raise InvalidArgumentError(f'mode must be "min" or "max", not {self.mode!r}.')

    def keep(self, records: Sequence[CheckpointRecord]) -> set[int]:
        scored = [(s, -r.step, r.step) for r in records if (s := _score(r, self.monitor, self.mode)) is not None]
        return {step for _, _, step in sorted(scored)[: self.k]}


@dataclass(frozen=True)
class KeepEvery:
    """Keep every checkpoint whose step is a multiple of ``steps`` (milestones)."""

    steps: int

    def __post_init__(self) -> None:
        positive_count("KeepEvery.steps", self.steps)

    def keep(self, records: Sequence[CheckpointRecord]) -> set[int]:
        return {r.step for r in records if r.step % self.steps == 0}


@dataclass(frozen=True)
class KeepInterval:
    """Keep one checkpoint per ``seconds`` of wall time: the oldest, then each one at least that much newer."""

    seconds: float

    def __post_init__(self) -> None:
        positive_seconds("KeepInterval.seconds", self.seconds)

    def keep(self, records: Sequence[CheckpointRecord]) -> set[int]:
        kept: set[int] = set()
        last: float | None = None
        for r in sorted(records, key=lambda r: r.step):
            if last is None or r.created - last >= self.seconds:
                kept.add(r.step)
                last = r.created
        return kept


@dataclass(frozen=True)
class AnyOf:
    """Keep what any of the policies keeps."""

    policies: tuple[RetentionPolicy, ...]

    def __init__(self, *policies: RetentionPolicy) -> None:
        object.__setattr__(self, "policies", tuple(policies))

    def keep(self, records: Sequence[CheckpointRecord]) -> set[int]:
        kept: set[int] = set()
        for policy in self.policies:
            kept |= policy.keep(records)
        return kept


def steps_to_delete(
    records: Sequence[CheckpointRecord],
    policy: RetentionPolicy | None,
    *,
    monitor: str | None = None,
    mode: str = "min",
    protect: frozenset[int] = frozenset(),
) -> list[int]:
    """Steps the policy lets go, oldest first; never the newest, the best by ``monitor``, nor ``protect``."""
    if policy is None or not records:
        return []
    kept = policy.keep(records) | {max(r.step for r in records)} | protect
    if monitor is not None and (best := best_record(records, monitor, mode)) is not None:
        kept.add(best.step)
    return sorted(r.step for r in records if r.step not in kept)
