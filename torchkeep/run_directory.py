"""A run directory: the manager's checkpoints named ``step-NNNNNNNN``, listed as records by step.

Reading a run directory never takes its lock: a checkpoint is listed only once
its manifest is committed, so a reader sees whole checkpoints or none. The
records are kept in memory between calls and a manifest is read again only
when its checkpoint is new or was replaced (its manifest changed size), so
listing a directory of hundreds of checkpoints after each save costs one
directory listing and one size query per checkpoint.
"""

from __future__ import annotations

import datetime
import re
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
    manifest_size: int
    record: CheckpointRecord
    shared: frozenset[str]  # the object files it refers to


class RunDirectory:
    """The checkpoints of one manager directory, by step.

    Args:
        storage: the storage holding the directory.
        prefix: the directory's key in it.
    """

    def __init__(self, storage: Storage, prefix: str) -> None:
        self.storage = storage
        self.prefix = prefix
        self._known: dict[int, _Known] = {}

    def key(self, step: int) -> str:
        """The key of a step's checkpoint."""
        return join_key(self.prefix, step_name(step))

    def records(self, *, warn: bool = True) -> list[CheckpointRecord]:
        """Every committed checkpoint, ordered by step (never by file time or name).

        A checkpoint whose manifest cannot be read is left out (with a warning when ``warn``).
        """
        self._refresh(warn)
        return [self._known[step].record for step in sorted(self._known)]

    def references(self) -> set[str] | None:
        """The object files the committed checkpoints refer to; None if one cannot be read (refer to all)."""
        if not self._refresh(warn=False):
            return None
        return set().union(*(known.shared for known in self._known.values()))

    def remember(self, step: int, manifest: Manifest) -> CheckpointRecord:
        """Record a checkpoint this process has just committed, without reading it back."""
        key = self.key(step)
        known = _Known(
            self.storage.size(join_key(key, MANIFEST_NAME)),
            record_of(self.storage, key, manifest, step),
            _shared(manifest),
        )
        self._known[step] = known
        return known.record

    def _refresh(self, warn: bool) -> bool:
        """Bring the known records up to date with the storage; False if a checkpoint could not be read."""
        complete = True
        present: set[int] = set()
        for name in self.storage.list(self.prefix):
            step = parse_step(name)
            if step is None:
                continue
            key = join_key(self.prefix, name)
            try:
                size = self.storage.size(join_key(key, MANIFEST_NAME))
            except CheckpointNotFoundError:
                continue  # never committed
            present.add(step)
            known = self._known.get(step)
            if known is not None and known.manifest_size == size and known.record.path == self.storage.describe(key):
                continue
            try:
                manifest = read_manifest(self.storage, key)
            except TorchkeepError as err:
                self._known.pop(step, None)
                present.discard(step)
                complete = False
                if warn:
                    warnings.warn(f"Skipping checkpoint {name}: {err}", RuntimeWarning, stacklevel=4)
                continue
            self._known[step] = _Known(
                size,
                record_of(self.storage, key, manifest, step),
                frozenset(s.file for s in manifest.shards if s.shared),
            )
        for step in set(self._known) - present:
            del self._known[step]
        return complete


def read_records(storage: Storage, prefix: str, *, warn: bool = True) -> list[CheckpointRecord]:
    """The committed checkpoints of a manager directory by step, read without taking its lock."""
    return RunDirectory(storage, prefix).records(warn=warn)
