"""CheckpointManager: training checkpoints in one directory, with retention and exact resume.

Each checkpoint is a native checkpoint named ``step-00000100`` inside the
manager's directory. The user's named states are saved under their names;
the RNG streams under ``_torchkeep_rng``; the step, metrics and metadata in
the manifest. Retention runs after each commit, and only then deletes.
"""

from __future__ import annotations

import atexit
import datetime
import math
import os
import re
import signal
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import FrameType
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from torchkeep.compression import Compression
from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidArgumentError,
    StateMismatchError,
    TorchkeepError,
)
from torchkeep.formats.native import read_manifest
from torchkeep.formats.objects import OBJECTS, is_object_name
from torchkeep.loading import load
from torchkeep.locking import FolderLock
from torchkeep.manifest import Manifest
from torchkeep.model_loading import load_into
from torchkeep.report import LoadReport
from torchkeep.retention import (
    AnyOf,
    CheckpointRecord,
    KeepBest,
    KeepEvery,
    KeepInterval,
    KeepLast,
    RetentionPolicy,
    best_record,
    steps_to_delete,
)
from torchkeep.rng import RNGState
from torchkeep.saving import SaveJob, prepare_save, write_job
from torchkeep.snapshot import StagingBuffer
from torchkeep.storage import Storage, resolve

__all__ = ["CheckpointManager", "SaveHandle"]

RNG_KEY = "_torchkeep_rng"
_NAME = re.compile(r"^step-(\d+)$")
_LOCK_NAME = ".torchkeep.lock"


def _metric(name: str, value: Any) -> float | str:
    if (isinstance(value, torch.Tensor) and value.numel() == 1) or isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(f"Metric {name!r} must be a number, not {type(value).__name__}.")
    value = float(value)
    return value if math.isfinite(value) else repr(value)  # "nan", "inf", "-inf" in JSON


def _read_metrics(raw: Any) -> dict[str, float]:
    if not isinstance(raw, dict):
        return {}
    return {k: float(v) for k, v in raw.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


class SaveHandle:
    """A save running in the background: ``wait()`` for its record, ``done()`` to poll.

    A failure in the background is re-raised, with its original traceback, by
    ``wait()``, by the manager's next ``save``, or by its ``close()``: never lost.
    """

    def __init__(self, step: int, future: Future[CheckpointRecord]) -> None:
        self.step = step
        self._future = future
        self.observed = False  # a failure already raised to the caller is not raised again by the manager

    def done(self) -> bool:
        """Whether the save has finished (committed or failed)."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> CheckpointRecord:
        """Block until the checkpoint is committed (and retention applied); return its record."""
        result = self._future.result(timeout) if self._future.exception(timeout) is None else None
        self.observed = True
        if result is None:
            self._future.result()  # re-raise the original failure with its traceback
        assert result is not None
        return result

    def __repr__(self) -> str:
        return f"SaveHandle(step={self.step}, done={self.done()})"


class CheckpointManager:
    """Saves training checkpoints into one directory, keeps the right ones, and resumes runs exactly.

    Args:
        directory: where checkpoints go (a path, or a ``memory://`` URL).
        keep_last: keep the newest N checkpoints.
        keep_best: keep the best K by ``monitor``.
        monitor: the metric that ranks checkpoints (``"val_loss"``).
        mode: ``"min"`` or ``"max"``: which way ``monitor`` is better.
        keep_every: keep every checkpoint whose step is a multiple of this.
        keep_interval: keep one checkpoint per this many seconds of wall time.
        retention: a further :class:`RetentionPolicy` of your own.
        save_every: :meth:`should_save` is true every this many steps.
        save_interval: :meth:`should_save` is true once this many seconds have passed since the last save.
        rng: save and restore the RNG streams (Python, numpy, torch CPU, each CUDA device).
        async_save: ``save`` returns once the state is copied into a reused staging buffer
            (pinned for GPU tensors) and writes, commits and applies retention in a
            background thread; see :meth:`save`.
        compression: compress every checkpoint (``"zstd"``, ``"zstd:LEVEL"`` or a
            :class:`Compression`); see :func:`torchkeep.save`. Tensors kept in the
            object folder by ``incremental`` stay uncompressed.
        incremental: store tensors of 64 KiB and more once, by content, in the
            directory's ``objects`` folder: a checkpoint whose frozen or unchanged
            tensors are already stored refers to them instead of writing them again.
            Every checkpoint still loads and verifies on its own; an object is
            deleted only once no committed checkpoint refers to it.
        max_staging_bytes: a bound on the staging buffer. A state larger than this is
            saved synchronously instead, tensor by tensor from where it lives, with a warning.
        install_signal_handler: True (SIGTERM and SIGUSR1) or a list of signals. On one,
            :meth:`should_save` turns true, and the next :meth:`save` commits then exits with status 0.
        storage: use this storage, with ``directory`` as the key of the folder in it.

    With no keep_* option and no ``retention``, every checkpoint is kept. The
    newest checkpoint and the best one are never deleted, and deletion runs only
    after a new checkpoint is committed. Saving a step that exists replaces it
    atomically. One manager writes to a directory at a time: a second one gets
    :class:`DirectoryLockedError`. Not thread-safe: call it from one thread.

    Example:
        >>> mgr = torchkeep.CheckpointManager("ckpt", keep_last=3, keep_best=1, monitor="val_loss")
        >>> start = mgr.restore(model=model, optimizer=optimizer)  # None on a fresh start
        >>> mgr.save(step, metrics={"val_loss": loss}, model=model, optimizer=optimizer)
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        keep_every: int | None = None,
        keep_interval: float | None = None,
        retention: RetentionPolicy | None = None,
        save_every: int | None = None,
        save_interval: float | None = None,
        rng: bool = True,
        async_save: bool = False,
        max_staging_bytes: int | None = None,
        compression: str | Compression | None = None,
        incremental: bool = False,
        install_signal_handler: bool | Sequence[int] = False,
        storage: Storage | None = None,
    ) -> None:
        if mode not in ("min", "max"):
            raise InvalidArgumentError(f'mode must be "min" or "max", not {mode!r}.')
        if keep_best is not None and monitor is None:
            raise InvalidArgumentError("keep_best needs monitor=, the metric that ranks checkpoints.")
        for name, value in (("save_every", save_every), ("save_interval", save_interval)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise InvalidArgumentError(f"{name} must be a positive number, not {value!r}.")
        policies: list[RetentionPolicy] = []
        if keep_last is not None:
            policies.append(KeepLast(keep_last))
        if keep_best is not None and monitor is not None:
            policies.append(KeepBest(keep_best, monitor, mode))
        if keep_every is not None:
            policies.append(KeepEvery(keep_every))
        if keep_interval is not None:
            policies.append(KeepInterval(keep_interval))
        if retention is not None:
            policies.append(retention)
        self.policy: RetentionPolicy | None = AnyOf(*policies) if policies else None
        self.monitor = monitor
        self.mode = mode
        self.save_every = save_every
        self.save_interval = save_interval
        self.rng = rng
        self.async_save = async_save
        self.max_staging_bytes = max_staging_bytes
        self.compression = Compression.parse(compression)
        self.incremental = incremental
        self._staging = StagingBuffer()
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: SaveHandle | None = None
        self._storage, self._prefix = resolve(directory, storage)
        self.directory = self._storage.describe(self._prefix)
        self._lock: FolderLock | None = FolderLock(
            self._storage, self._prefix, name=_LOCK_NAME, blocking=False, holder="another CheckpointManager"
        )
        self._last_save = time.monotonic()
        self._preempted: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        if install_signal_handler:
            signals = (signal.SIGTERM, signal.SIGUSR1) if install_signal_handler is True else install_signal_handler
            for signum in signals:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        atexit.register(self._close_at_exit)

    # -- context and lifetime -------------------------------------------------------------

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Wait for a save in flight, release the directory and restore signal handlers.

        Re-raises the failure of a background save. Safe to call twice; also
        run at interpreter exit.
        """
        atexit.unregister(self._close_at_exit)
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler)
            self._previous_handlers.clear()
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except Exception as err:  # at exit there is no caller left to raise to
            warnings.warn(f"The last background save of {self.directory!r} failed: {err!r}", stacklevel=1)

    def wait(self) -> CheckpointRecord | None:
        """Wait for the save in flight, if any; return its record or re-raise its failure."""
        handle, self._inflight = self._inflight, None
        if handle is None:
            return None
        if handle.observed and handle._future.exception() is not None:
            return None  # its caller has already seen the failure
        return handle.wait()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._preempted = signum

    @property
    def staging_bytes(self) -> int:
        """Host memory held for asynchronous snapshots (allocated once, reused by every save)."""
        return self._staging.nbytes

    @property
    def preempted(self) -> bool:
        """Whether a preemption signal has arrived (see ``install_signal_handler``)."""
        return self._preempted is not None

    # -- saving ---------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        """True when ``step`` is due by ``save_every``, ``save_interval`` has passed, or a preemption signal came."""
        if self._preempted is not None:
            return True
        if self.save_every is not None and step % self.save_every == 0:
            return True
        return self.save_interval is not None and time.monotonic() - self._last_save >= self.save_interval

    def _key(self, step: int) -> str:
        return f"{self._prefix}/step-{step:08d}" if self._prefix else f"step-{step:08d}"

    def save(
        self,
        step: int,
        *,
        metrics: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        async_save: bool | None = None,
        **state: Any,
    ) -> Any:
        """Save the named states as the checkpoint of ``step``, then apply retention.

        Args:
            step: the training step (a non-negative int); an existing one is replaced atomically.
            metrics: numbers to rank and show checkpoints by (tensors and numpy scalars accepted).
            metadata: plain JSON kept with the checkpoint.
            async_save: override the manager's ``async_save`` for this call.
            **state: ``Stateful`` objects (modules, optimizers, schedulers, GradScaler, samplers,
                your own) are saved through ``state_dict()``; anything else as a plain tree.

        Returns:
            Saving synchronously, the :class:`CheckpointRecord` of the committed
            checkpoint. Saving asynchronously, a :class:`SaveHandle`, returned as
            soon as the state has been copied into the staging buffer: training may
            change the parameters at once; the checkpoint holds the values at the
            call. At most one save is in flight: a new ``save`` first waits for the
            previous one to commit, so checkpoints commit in order, and re-raises
            its failure if it failed.
        """
        if self._lock is None:
            raise InvalidArgumentError("This CheckpointManager is closed.")
        if type(step) is not int or step < 0:
            raise InvalidArgumentError(f"step must be a non-negative int, not {step!r}.")
        reserved = [name for name in state if name.startswith("_torchkeep")]
        if reserved:
            raise InvalidArgumentError(f"State names starting with '_torchkeep' are reserved: {reserved}.")
        self.wait()  # one save in flight; the staging buffer is free again
        tree = {name: obj.state_dict() if _is_stateful(obj) else obj for name, obj in state.items()}
        if self.rng:
            tree[RNG_KEY] = RNGState().state_dict()
        encoded = {name: _metric(name, value) for name, value in (metrics or {}).items()}
        job = prepare_save(
            tree,
            self._key(step),
            metadata={"step": step, "metrics": encoded, "metadata": metadata or {}},
            compression=self.compression,
            storage=self._storage,
        )
        if self.incremental:
            job.objects = self._objects_key()
        self._last_save = time.monotonic()
        wants_async = self.async_save if async_save is None else async_save
        size = sum(p.nbytes for p in job.planned)
        if wants_async and self.max_staging_bytes is not None and size > self.max_staging_bytes:
            warnings.warn(
                f"The state of step {step} is {size} bytes, over max_staging_bytes={self.max_staging_bytes}; "
                "it is saved synchronously.",
                RuntimeWarning,
                stacklevel=2,
            )
            wants_async = False
        if not wants_async:
            record = self._commit(job, step)
            self._exit_if_preempted()
            return record
        job.planned = self._staging.snapshot(job.planned)  # the only part that blocks training
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchkeep-save")
        handle = SaveHandle(step, self._executor.submit(self._commit, job, step))
        self._inflight = handle
        if self._preempted is not None:
            self.wait()
            self._exit_if_preempted()
        return handle

    def _commit(self, job: SaveJob, step: int) -> CheckpointRecord:
        """Write, commit and apply retention: the stages after the snapshot, on either path."""
        manifest = write_job(job)
        assert manifest is not None  # a manager writes native checkpoints
        self._apply_retention(just_saved=step)
        self._sweep_objects()
        return _record(self._storage, job.key, manifest)

    def _exit_if_preempted(self) -> None:
        if self._preempted is not None:
            self.close()
            raise SystemExit(0)

    def _apply_retention(self, just_saved: int) -> None:
        records = self.list()
        protect = frozenset({just_saved})  # even when older steps than the newest are saved again
        for step in steps_to_delete(records, self.policy, monitor=self.monitor, mode=self.mode, protect=protect):
            self._storage.delete(self._key(step))  # an atomic rename first: never half-deleted and listed

    def delete(self, step: int) -> None:
        """Delete the checkpoint of ``step`` now, and any stored objects only it referred to."""
        if self._lock is None:
            raise InvalidArgumentError("This CheckpointManager is closed.")
        self.wait()
        key = self._key(step)
        if not self._storage.exists(key):
            raise CheckpointNotFoundError(f"{self.directory!r} has no checkpoint of step {step}.", path=self.directory)
        self._storage.delete(key)
        self._sweep_objects()

    def _objects_key(self) -> str:
        return f"{self._prefix}/{OBJECTS}" if self._prefix else OBJECTS

    def _sweep_objects(self) -> None:
        """Delete objects no committed checkpoint refers to (left by deletions or by a crash mid-save)."""
        folder = self._objects_key()
        stored = [n for n in self._storage.list(folder) if is_object_name(n)]
        if not stored:
            return
        referenced: set[str] = set()
        for name in self._storage.list(self._prefix):
            if not _NAME.match(name):
                continue
            key = f"{self._prefix}/{name}" if self._prefix else name
            try:
                manifest = read_manifest(self._storage, key)
            except CheckpointNotFoundError:
                continue  # never committed: it refers to nothing
            except TorchkeepError as err:
                warnings.warn(
                    f"Not removing unused objects: checkpoint {name} cannot be read ({err}).",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return  # what it refers to is unknown, so everything stays
            referenced.update(s.file for s in manifest.shards if s.shared)
        for name in stored:
            if name not in referenced:
                self._storage.delete(f"{folder}/{name}")

    # -- listing --------------------------------------------------------------------------

    def list(self) -> list[CheckpointRecord]:
        """Every committed checkpoint, ordered by step (never by file time or name).

        A checkpoint whose manifest cannot be read is left out with a warning.
        """
        return read_records(self._storage, self._prefix)

    def latest(self) -> CheckpointRecord | None:
        """The checkpoint with the highest step, or None."""
        records = self.list()
        return records[-1] if records else None

    def best(self) -> CheckpointRecord | None:
        """The checkpoint with the best ``monitor`` metric (the newest on a tie), or None."""
        if self.monitor is None:
            raise InvalidArgumentError("best() needs the manager's monitor= metric.")
        return best_record(self.list(), self.monitor, self.mode)

    # -- restoring ------------------------------------------------------------------------

    def restore(
        self, step: int | Literal["best"] | None = None, *, strict: bool = True, **state: Any
    ) -> CheckpointRecord | None:
        """Restore the named states (and the RNG streams) from a checkpoint.

        With no ``step``, the newest checkpoint that verifies: a damaged or
        incomplete newer one is skipped with a warning naming it and why.
        ``step="best"`` picks the best by ``monitor``.

        Args:
            step: a step number, ``"best"``, or None for the newest good one.
            strict: passed to :func:`torchkeep.load_into` for modules and optimizers.
            **state: the objects to restore, by the names they were saved under:
                Stateful objects are loaded in place, plain dicts updated in place.

        Returns:
            The record restored from, or None when the directory has no checkpoint
            (a fresh start).

        Raises:
            CheckpointNotFoundError: the given step does not exist.
            CorruptCheckpointError: no checkpoint in the directory verifies.
            StateMismatchError: a named state is not in the checkpoint, or does not fit.
        """
        self.wait()
        records = self.list()
        if step is None:
            candidates = list(reversed(records))
            if not candidates:
                return None
        elif step == "best":
            best = self.best()
            if best is None:
                raise CheckpointNotFoundError(
                    f"No checkpoint in {self.directory!r} has the metric {self.monitor!r}.", path=self.directory
                )
            candidates = [best]
        else:
            candidates = [r for r in records if r.step == step]
            if not candidates:
                raise CheckpointNotFoundError(
                    f"{self.directory!r} has no checkpoint of step {step}; it has {[r.step for r in records]}.",
                    path=self.directory,
                )
        reasons = []
        for record in candidates:
            key = self._key(record.step)
            try:
                tree = load(key, storage=self._storage, verify=True)
            except TorchkeepError as err:
                if step is not None:
                    raise
                warnings.warn(
                    f"Skipping checkpoint step {record.step} ({record.path}): {err}", RuntimeWarning, stacklevel=2
                )
                reasons.append(f"step {record.step}: {err}")
                continue
            self._apply(tree, state, record, strict)
            return record
        raise CorruptCheckpointError(
            f"No checkpoint in {self.directory!r} could be restored:\n  " + "\n  ".join(reasons),
            path=self.directory,
        )

    def _apply(self, tree: dict[str, Any], state: dict[str, Any], record: CheckpointRecord, strict: bool) -> None:
        missing = [name for name in state if name not in tree]
        if missing:
            saved = [name for name in tree if not name.startswith("_torchkeep")]
            raise StateMismatchError(
                f"Checkpoint {record.path!r} has no state named {missing}; it holds {saved}.",
                report=LoadReport(missing=missing),
                path=record.path,
            )
        for name, obj in state.items():
            if isinstance(obj, (nn.Module, torch.optim.Optimizer)):
                load_into(obj, tree[name], strict=strict)
            elif _is_stateful(obj):
                obj.load_state_dict(tree[name])
            elif isinstance(obj, dict):
                obj.clear()
                obj.update(tree[name])
            else:
                raise InvalidArgumentError(
                    f"Cannot restore {name!r} into a {type(obj).__name__}: pass an object with "
                    "load_state_dict(), or a dict to be updated in place."
                )
        if self.rng and RNG_KEY in tree:
            RNGState().load_state_dict(tree[RNG_KEY])


def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _with_step(record: CheckpointRecord, step: int) -> CheckpointRecord:
    return CheckpointRecord(step, record.path, record.metrics, record.metadata, record.created, record.size)


def _record(storage: Storage, key: str, manifest: Manifest) -> CheckpointRecord:
    meta = manifest.metadata
    user = meta.get("metadata")
    try:
        created = datetime.datetime.fromisoformat(manifest.created.replace("Z", "+00:00")).timestamp()
    except ValueError:
        created = 0.0
    return CheckpointRecord(
        step=int(meta.get("step", -1)),
        path=storage.describe(key),
        metrics=_read_metrics(meta.get("metrics")),
        metadata=user if isinstance(user, dict) else {},
        created=created,
        size=sum(s.size for s in manifest.shards),
    )


def read_records(storage: Storage, prefix: str, *, warn: bool = True) -> list[CheckpointRecord]:
    """The committed checkpoints of a manager directory by step, read without taking its lock.

    A checkpoint whose manifest cannot be read is left out (with a warning when ``warn``).
    """
    records = []
    for name in storage.list(prefix):
        match = _NAME.match(name)
        if not match:
            continue
        key = f"{prefix}/{name}" if prefix else name
        try:
            record = _record(storage, key, read_manifest(storage, key))
        except TorchkeepError as err:
            if warn:
                warnings.warn(f"Skipping checkpoint {name}: {err}", RuntimeWarning, stacklevel=3)
            continue
        records.append(record if record.step == int(match.group(1)) else _with_step(record, int(match.group(1))))
    return sorted(records, key=lambda r: r.step)
