"""A run directory: the manager's checkpoints named ``step-NNNNNNNN``, listed as records by step.

Reading a run directory never takes its lock: a checkpoint is listed only once
its manifest is committed, so a reader sees whole checkpoints or none.

Records are kept in memory between calls, and a listing of the directory
brings them up to date: a checkpoint deleted by anyone (``torchkeep prune``,
``rm``) drops out, a new one is read. What is done with one already known
depends on who lists:

- A reader stats its manifest and reads it again when it was replaced (a
  writer saved that step again): one stat per checkpoint.
- The writer, while it holds the directory's lock (:meth:`RunDirectory.hold`),
  trusts what it has committed or checked since taking the lock, since only it
  commits, replaces or deletes checkpoints there (``torchkeep prune`` takes the
  lock too); what it knew before taking the lock is checked once. A save
  decides on what the writer knows and lists the directory only when
  retention would delete something, so that a checkpoint removed behind its
  back is never counted as kept: a save makes the same storage calls with 3
  checkpoints as with 1,000.

The writer does not notice a checkpoint replaced in place, while it holds the
lock, by something that ignores the lock (``torchkeep.save`` or a copy into
the folder of a step it knows). A folder being removed by ``rm -r`` counts as
present until it is gone from the listing.
"""

from __future__ import annotations

import datetime
import re
import threading
import warnings
from dataclasses import dataclass
from typing import Any

from torchkeep.errors import CheckpointNotFoundError, TorchkeepError
from torchkeep.formats.native import read_manifest
from torchkeep.manifest import MANIFEST_NAME, Manifest
from torchkeep.retention import CheckpointRecord
from torchkeep.storage import Storage, join_key

__all__ = ["RunDirectory", "read_records"]

_STEP_NAME = re.compile(r"^step-(\d+)$")


def step_name(step: int) -> str:
    """The folder name of a step's checkpoint."""
    return f"step-{step:08d}"


def parse_step(name: str) -> int | None:
    """The step a folder name holds, or None when it is not a checkpoint name."""
    match = _STEP_NAME.match(name)
    return int(match.group(1)) if match else None


def _metrics(raw: Any) -> dict[str, float]:
    if not isinstance(raw, dict):
        return {}
    return {k: float(v) for k, v in raw.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


def record_of(storage: Storage, key: str, manifest: Manifest, step: int) -> CheckpointRecord:
    """The record of a committed checkpoint, from its manifest; the step is the one its name holds."""
    meta = manifest.metadata
    user = meta.get("metadata")
    try:
        created = datetime.datetime.fromisoformat(manifest.created.replace("Z", "+00:00")).timestamp()
    except ValueError:
        created = 0.0
    return CheckpointRecord(
        step=step,
        path=storage.describe(key),
        metrics=_metrics(meta.get("metrics")),
        metadata=user if isinstance(user, dict) else {},
        created=created,
        size=sum(s.size for s in manifest.shards),
    )


def _shared(manifest: Manifest) -> frozenset[str]:
    return frozenset(s.file for s in manifest.shards if s.shared)


@dataclass(frozen=True)
class _Known:
    stamp: object  # the manifest's identity (or size) when it was read: it changes when the step is saved again
    record: CheckpointRecord
    shared: frozenset[str]  # the object files it refers to


class RunDirectory:
    """The checkpoints of one manager directory, by step; see the module docstring for what is cached.

    Thread-safe: a manager's background save and its caller's ``list()`` may run at once.

    Args:
        storage: the storage holding the directory.
        prefix: the directory's key in it.
    """

    def __init__(self, storage: Storage, prefix: str) -> None:
        self.storage = storage
        self.prefix = prefix
        self._known: dict[int, _Known] = {}
        # While this process holds the writer lock: the names (to steps) committed or checked since it took it.
        self._trusted: dict[str, int] | None = None
        self._listed = False  # listed since the lock was taken
        self._lock = threading.Lock()

    def key(self, step: int) -> str:
        """The key of a step's checkpoint."""
        return join_key(self.prefix, step_name(step))

    def hold(self, held: bool) -> None:
        """Say that this process has taken (True) or let go of (False) the directory's writer lock."""
        with self._lock:
            self._trusted = {} if held else None
            self._listed = False

    def records(self, *, warn: bool = True, relist: bool = True) -> list[CheckpointRecord]:
        """Every committed checkpoint, ordered by step (never by file time or name).

        A checkpoint whose manifest cannot be read is left out (with a warning when ``warn``).
        With ``relist=False``, the writer (holding the lock) gets what it knows without listing
        the directory again: a checkpoint removed by ``rm`` may still be in it.
        """
        with self._lock:
            if relist or self._trusted is None or not self._listed:
                self._refresh(warn)
            return [self._known[step].record for step in sorted(self._known)]

    def references(self) -> set[str] | None:
        """The object files the committed checkpoints refer to; None if one cannot be read (refer to all)."""
        with self._lock:
            if not self._refresh(warn=False):
                return None
            return set().union(*(known.shared for known in self._known.values()))

    def remember(self, step: int, manifest: Manifest) -> CheckpointRecord:
        """Record a checkpoint this process has just committed, without reading it back."""
        key = self.key(step)
        known = _Known(
            self._stamp(join_key(key, MANIFEST_NAME)), record_of(self.storage, key, manifest, step), _shared(manifest)
        )
        with self._lock:
            self._known[step] = known
            if self._trusted is not None:
                self._trusted[step_name(step)] = step
        return known.record

    def forget(self, step: int) -> None:
        """Drop the record of a checkpoint this process has just deleted."""
        with self._lock:
            self._known.pop(step, None)
            if self._trusted is not None:
                self._trusted.pop(step_name(step), None)

    def _stamp(self, manifest_key: str) -> object:
        """What tells a manifest from the one that replaces it: (device, inode, ctime) where known, else its size."""
        identity = getattr(self.storage, "identity", None)
        return identity(manifest_key) if identity is not None else self.storage.size(manifest_key)

    def _refresh(self, warn: bool) -> bool:
        """Bring the known records up to date with the storage; False if a checkpoint could not be read."""
        complete = True
        names = self.storage.list(self.prefix)
        trusted = self._trusted
        present: set[int] = set()
        if trusted is not None:  # set operations, so that trusted names cost no Python per name
            listed = set(names)
            for name in trusted.keys() - listed:
                self._known.pop(trusted.pop(name), None)
            names = sorted(listed - trusted.keys())
            present.update(trusted.values())
        for name in names:
            step = parse_step(name)
            if step is None or step in present:  # "step-5" beside "step-00000005": one record per step
                continue
            key = join_key(self.prefix, name)
            try:
                stamp = self._stamp(join_key(key, MANIFEST_NAME))
            except CheckpointNotFoundError:
                continue  # never committed
            present.add(step)
            known = self._known.get(step)
            if known is None or known.stamp != stamp:
                try:
                    manifest = read_manifest(self.storage, key)
                except TorchkeepError as err:
                    self._known.pop(step, None)
                    present.discard(step)
                    complete = False
                    if warn:
                        warnings.warn(f"Skipping checkpoint {name}: {err}", RuntimeWarning, stacklevel=4)
                    continue
                self._known[step] = _Known(stamp, record_of(self.storage, key, manifest, step), _shared(manifest))
            if trusted is not None and name == step_name(step):  # "step-5" is read, never trusted
                trusted[name] = step
        for step in self._known.keys() - present:
            del self._known[step]
        self._listed = trusted is not None
        return complete


def read_records(storage: Storage, prefix: str, *, warn: bool = True) -> list[CheckpointRecord]:
    """The committed checkpoints of a manager directory by step, read without taking its lock."""
    return RunDirectory(storage, prefix).records(warn=warn)
