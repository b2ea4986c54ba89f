"""CheckpointManager: training checkpoints in one directory, with retention and exact resume.

Each checkpoint is a native checkpoint named ``step-00000100`` inside the
manager's directory (:mod:`torchkeep.run_directory`). The user's named states
are saved under their names; the RNG streams under ``_torchkeep_rng``; the
step, metrics and metadata in the manifest. Retention runs after each commit,
and only then deletes; unshared objects of incremental checkpoints are swept
after it (:mod:`torchkeep.object_folder`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import FrameType
from typing import Any, Literal, overload

import numpy as np
import torch
from torch import nn

from torchkeep import distributed
from torchkeep.compression import Compression
from torchkeep.distributed import RANKS_KEY, Group
from torchkeep.dtypes import torch_dtype_name
from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DistributedError,
    InvalidArgumentError,
    StateMismatchError,
    StorageError,
    UnsupportedFormatError,
)
from torchkeep.formats import read_consistently
from torchkeep.formats.native import open_native
from torchkeep.formats.source import ManifestSource, Source
from torchkeep.loading import read_source
from torchkeep.locking import FolderLock
from torchkeep.manifest import Manifest
from torchkeep.model_loading import load_into
from torchkeep.object_folder import ObjectFolder
from torchkeep.report import LoadReport, Mismatch
from torchkeep.retention import (
    AnyOf,
    CheckpointRecord,
    KeepBest,
    KeepEvery,
    KeepInterval,
    KeepLast,
    RetentionPolicy,
    best_record,
    positive_count,
    positive_seconds,
    steps_to_delete,
)
from torchkeep.rng import RNGState
from torchkeep.run_directory import RunDirectory
from torchkeep.saving import SaveJob, prepare_save, write_job
from torchkeep.snapshot import StagingBuffer
from torchkeep.stateful import is_stateful
from torchkeep.storage import Storage, resolve
from torchkeep.tree import decode_tree, select_node, tensor_names

__all__ = ["CheckpointManager", "SaveHandle"]

#: How many times restore lists again when a writer deleted every listed step while it read them.
_RESTORE_ROUNDS = 10
_log = logging.getLogger("torchkeep")

RNG_KEY = "_torchkeep_rng"
_LOCK_NAME = ".torchkeep.lock"
_THREAD = "torchkeep-save"
#: What makes restore() move on to an older checkpoint: the checkpoint, not the caller's objects, is at fault.
_DAMAGE = (CorruptCheckpointError, CheckpointNotFoundError, UnsupportedFormatError, StorageError)


def _undoer(objects: dict[str, Any], *, rng: bool) -> Any:
    """A function that puts ``objects`` (and the RNG streams) back as they are now, for a restore that fails."""
    import copy

    kept = {name: copy.deepcopy(obj.state_dict()) for name, obj in objects.items() if is_stateful(obj)}
    streams = RNGState().state_dict() if rng else None

    def undo() -> None:
        for name, state in kept.items():
            with contextlib.suppress(Exception):  # best effort, on the way to re-raising the real failure
                objects[name].load_state_dict(state)
        if streams is not None:
            RNGState().load_state_dict(streams)

    return undo


def _sharded(state: dict[str, Any]) -> bool:
    """Whether any module's parameters (or any state tree) hold DTensors: a save through DCP."""
    for obj in state.values():
        if isinstance(obj, nn.Module):
            if distributed.is_sharded(dict(obj.named_parameters())):
                return True
        elif not is_stateful(obj) and distributed.is_sharded(obj):
            return True
    return False


def _metric(name: str, value: Any) -> float | str:
    if (isinstance(value, torch.Tensor) and value.numel() == 1) or isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(f"Metric {name!r} must be a number, not {type(value).__name__}.")
    value = float(value)
    return value if math.isfinite(value) else repr(value)  # "nan", "inf", "-inf" in JSON


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

    def failed(self) -> bool:
        """Whether the save has finished with a failure."""
        return self._future.done() and self._future.exception() is not None

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


class _Held:
    """What a manager holds that must be given back: the writer lock, the save thread, signal handlers.

    Kept apart from the manager so that a ``weakref.finalize`` can give it all
    back when the manager is garbage collected or the interpreter exits,
    without keeping the manager alive.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.lock: FolderLock | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.inflight: SaveHandle | None = None
        self.previous_handlers: dict[int, Any] = {}
        self.preempted: int | None = None

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.preempted = signum

    def start_thread(self) -> ThreadPoolExecutor:
        """Start the save thread, and say at interpreter exit what it still has to finish."""
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_THREAD)
        # Runs before the interpreter joins the save thread (hooks run newest first).
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            register(self.finish_at_exit)
        return self.executor

    def finish_at_exit(self) -> None:
        """At exit, a save still writing is finished, and the user told; a second Ctrl-C abandons it at once."""
        handle = self.inflight
        if handle is None or handle.done():
            return
        print(
            f"torchkeep: finishing the save of step {handle.step} in {self.directory} before exiting "
            "(Ctrl-C again abandons it; the checkpoints already saved stay intact).",
            file=sys.stderr,
            flush=True,
        )
        try:
            handle._future.exception()  # wait; a failure is reported by the finalizer
        except KeyboardInterrupt:
            print(
                f"torchkeep: abandoned the save of step {handle.step}; nothing of it was published, and the "
                "next save in that directory removes what it left.",
                file=sys.stderr,
                flush=True,
            )
            os._exit(130)  # the save thread cannot be stopped from here; leave without a traceback

    def wait(self) -> CheckpointRecord | None:
        """Wait for the save in flight, if any; return its record or re-raise its failure."""
        handle, self.inflight = self.inflight, None
        if handle is None:
            return None
        if handle.observed and handle.failed():
            return None  # its caller has already seen the failure
        return handle.wait()

    def release(self) -> None:
        """Stop the save thread, restore signal handlers and unlock; safe to call twice."""
        if self.executor is not None:
            # Never join the save thread from itself (a finalizer may run on any thread).
            self.executor.shutdown(wait=not threading.current_thread().name.startswith(_THREAD))
            self.executor = None
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        self.previous_handlers.clear()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def finalize(self) -> None:
        """Run when the manager is collected or at interpreter exit: finish the save in flight, then release."""
        try:
            self.wait()
        except Exception as err:  # no caller is left to raise to
            warnings.warn(f"The last background save of {self.directory!r} failed: {err!r}", stacklevel=1)
        finally:
            self.release()


@dataclasses.dataclass(frozen=True)
class _Committer:
    """The stages after the snapshot, on either path: write, commit, apply retention, sweep objects."""

    run: RunDirectory
    objects: ObjectFolder
    policy: RetentionPolicy | None
    monitor: str | None
    mode: Literal["min", "max"]
    keep_best: bool

    def commit(self, job: SaveJob, step: int) -> CheckpointRecord:
        manifest = write_job(job)
        assert manifest is not None  # a manager writes native checkpoints
        return self.settle(manifest, job.key, step)

    def settle(self, manifest: Manifest, key: str, step: int) -> CheckpointRecord:
        """After a commit: read it back, remember it, apply retention."""
        # Read it back (manifest, shard sizes and headers) before anything older may be deleted:
        # retention must never run after a commit that readers would refuse.
        open_native(self.run.storage, key).stored  # noqa: B018 - checking, not using
        record = self.run.remember(step, manifest)
        protect = frozenset({step})  # even when older steps than the newest are saved again
        # What this writer knows tells whether anything goes, without listing the directory; before deleting,
        # it is listed again, so that a checkpoint removed behind the writer's back (rm) never counts as kept.
        records = self.run.records(relist=False)
        doomed = steps_to_delete(records, self.policy, monitor=self.monitor, mode=self.mode, protect=protect)
        if doomed:
            records = self.run.records()
            doomed = steps_to_delete(records, self.policy, monitor=self.monitor, mode=self.mode, protect=protect)
        if doomed and self.keep_best and not any(self.monitor in r.metrics for r in records):
            warnings.warn(
                f"No checkpoint in {self.run.storage.describe(self.run.prefix)!r} has the metric "
                f"{self.monitor!r} that keep_best ranks by, so nothing is deleted: pass it in metrics=.",
                RuntimeWarning,
                stacklevel=2,
            )
            doomed = []
        for old in doomed:
            self.run.storage.delete(self.run.key(old))  # an atomic rename first: never half-deleted and listed
            self.run.forget(old)
        self.objects.sweep()
        return record


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
        process_group: in a torch.distributed job the manager works for every rank of the
            default group (see "Distributed training" below); pass a group to work for its
            ranks only, or False to ignore torch.distributed.
        timeout: seconds a rank waits for the others during a distributed save or restore
            before raising :class:`DistributedError` (a rank that died is noticed at once).

    With no keep_* option and no ``retention``, every checkpoint is kept. The
    newest checkpoint and the best one are never deleted, and deletion runs only
    after a new checkpoint is committed. Saving a step that exists replaces it
    atomically.

    Locking: constructing a manager writes nothing and locks nothing, and
    reading (:meth:`list`, :meth:`latest`, :meth:`best`, :meth:`restore`)
    never takes or waits for the lock: a checkpoint is visible only once it is
    committed, so a reader in another process sees whole checkpoints while a
    writer saves. The first operation that writes (:meth:`save`,
    :meth:`delete`, retention) takes the directory's writer lock; it is held
    until :meth:`close`, the end of a ``with`` block, or the manager being
    garbage collected (or its process ending). A second live writer gets
    :class:`DirectoryLockedError` naming the holder's pid and host. While it
    holds the lock, the manager trusts its own records and re-reads no
    manifest on a save (see :mod:`torchkeep.run_directory`). Not
    thread-safe: call one manager from one thread.

    Distributed training: when torch.distributed is initialized, every rank builds the
    same manager (a collective: it makes the manager's own gloo group) and calls
    ``save`` and ``restore`` with its own objects. Replicated state (DDP) is written
    by rank 0; sharded state (DTensor, FSDP2) by every rank through
    torch.distributed.checkpoint. Samplers (and loaders tracking one) and the RNG
    streams are each rank's own and saved per rank. Rank 0 commits only once every
    rank has written its part, and alone takes the lock and applies retention; a
    rank that fails or dies makes every rank raise :class:`DistributedError`, and
    nothing is committed. A sharded checkpoint restores on any number of ranks,
    or in one process without torch.distributed.

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
        process_group: Any = None,
        timeout: float = 600.0,
    ) -> None:
        if mode not in ("min", "max"):
            raise InvalidArgumentError(f'mode must be "min" or "max", not {mode!r}.')
        if keep_best is not None and monitor is None:
            raise InvalidArgumentError("keep_best needs monitor=, the metric that ranks checkpoints.")
        if save_every is not None:
            positive_count("save_every", save_every)
        if save_interval is not None:
            positive_seconds("save_interval", save_interval)
        if max_staging_bytes is not None:
            positive_count("max_staging_bytes", max_staging_bytes)
        positive_seconds("timeout", timeout)
        if retention is not None and not isinstance(retention, RetentionPolicy):
            raise InvalidArgumentError(
                f"retention must have a keep(records) method (a RetentionPolicy), not a {type(retention).__name__}."
            )
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
        storage, prefix = resolve(directory, storage)
        self._run = RunDirectory(storage, prefix)
        self._objects = ObjectFolder(self._run)
        self._retention = _Committer(self._run, self._objects, self.policy, monitor, mode, keep_best is not None)
        self.directory = storage.describe(prefix)
        self._closed = False
        self._last_save = time.monotonic()
        self._held = _Held(self.directory)
        self._group = Group.of(process_group, timeout)
        if self._group is not None and not callable(getattr(storage, "join", None)):
            raise InvalidArgumentError(
                f"{self.directory!r} is in storage that only this process sees ({type(storage).__name__}); the "
                "ranks of a distributed job need a folder every rank reaches (a shared file system or an object "
                "store). Pass process_group=False to use it from this rank alone."
            )
        self._dcp_staging: dict[str, torch.Tensor] = {}
        if install_signal_handler:
            signals = (signal.SIGTERM, signal.SIGUSR1) if install_signal_handler is True else install_signal_handler
            for signum in signals:
                self._held.previous_handlers[signum] = signal.signal(signum, self._held.on_signal)
        # Not a bound method: the finalizer must not keep the manager alive.
        self._finalizer = weakref.finalize(self, self._held.finalize)

    # -- context and lifetime -------------------------------------------------------------

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Wait for a save in flight, release the directory and restore signal handlers.

        Re-raises the failure of a background save. Safe to call twice; also
        run when the manager is garbage collected and at interpreter exit.
        """
        self._closed = True
        try:
            self._held.wait()
        finally:
            self._finalizer.detach()
            self._held.release()
            self._run.hold(False)

    def wait(self) -> CheckpointRecord | None:
        """Wait for the save in flight, if any; return its record or re-raise its failure."""
        return self._held.wait()

    def _writer(self) -> None:
        """Take the directory's writer lock, once, before the first write."""
        if self._closed:
            raise InvalidArgumentError("This CheckpointManager is closed.")
        if self._group is not None and not self._group.is_coordinator:
            return  # rank 0 writes, locks and deletes for the job
        if self._held.lock is None:
            self._held.lock = FolderLock(
                self._run.storage, self._run.prefix, name=_LOCK_NAME, blocking=False, holder="another CheckpointManager"
            )
            self._run.hold(True)  # only this manager changes the directory now: its records need no re-reading

    @property
    def staging_bytes(self) -> int:
        """Host memory held for asynchronous snapshots (allocated once, reused by every save)."""
        return self._staging.nbytes

    @property
    def preempted(self) -> bool:
        """Whether a preemption signal has arrived (see ``install_signal_handler``)."""
        return self._held.preempted is not None

    # -- saving ---------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        """True when ``step`` is due by ``save_every``, ``save_interval`` has passed, or a preemption signal came.

        In a distributed job with ``save_interval`` or a signal handler, the ranks
        agree (one small collective on the manager's group), so that all of them
        save at the same step: call it on every rank at every step it is called on one.
        """
        due = (
            self._held.preempted is not None
            or (self.save_every is not None and step % self.save_every == 0)
            or (self.save_interval is not None and time.monotonic() - self._last_save >= self.save_interval)
        )
        if self._group is None or (self.save_interval is None and not self._held.previous_handlers):
            return due
        return self._group.any(f"agreeing whether step {step} saves", due)

    @overload
    def save(
        self,
        step: int,
        *,
        metrics: dict[str, Any] | None = ...,
        metadata: dict[str, Any] | None = ...,
        async_save: Literal[False],
        **state: Any,
    ) -> CheckpointRecord: ...

    @overload
    def save(
        self,
        step: int,
        *,
        metrics: dict[str, Any] | None = ...,
        metadata: dict[str, Any] | None = ...,
        async_save: Literal[True],
        **state: Any,
    ) -> SaveHandle: ...

    @overload
    def save(
        self,
        step: int,
        *,
        metrics: dict[str, Any] | None = ...,
        metadata: dict[str, Any] | None = ...,
        async_save: None = ...,
        **state: Any,
    ) -> CheckpointRecord | SaveHandle: ...

    def save(
        self,
        step: int,
        *,
        metrics: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        async_save: bool | None = None,
        **state: Any,
    ) -> CheckpointRecord | SaveHandle:
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

        Raises:
            DirectoryLockedError: another live manager writes to this directory.
        """
        if type(step) is not int or step < 0:
            raise InvalidArgumentError(f"step must be a non-negative int, not {step!r}.")
        reserved = [name for name in state if name.startswith("_torchkeep")]
        if reserved:
            raise InvalidArgumentError(f"State names starting with '_torchkeep' are reserved: {reserved}.")
        if self._group is not None:
            wants = self.async_save if async_save is None else async_save
            return self._save_distributed(self._group, step, metrics, metadata, wants, state)
        self._writer()
        self.wait()  # one save in flight; the staging buffer is free again
        tree = {name: obj.state_dict() if is_stateful(obj) else obj for name, obj in state.items()}
        if self.rng:
            tree[RNG_KEY] = RNGState().state_dict()
        if self.monitor is not None and metrics and self.monitor not in metrics:
            raise InvalidArgumentError(
                f"metrics= holds {sorted(metrics)} but not monitor={self.monitor!r}; nothing was saved. A misspelled "
                "monitor ranks nothing, and keep_last would then delete the best checkpoint. Pass the monitored "
                "metric, fix monitor=, or save without metrics= (such a checkpoint is not ranked)."
            )
        encoded = {name: _metric(name, value) for name, value in (metrics or {}).items()}
        job = prepare_save(
            tree,
            self._run.key(step),
            metadata={"step": step, "metrics": encoded, "metadata": metadata or {}},
            compression=self.compression,
            objects=self._objects.key if self.incremental else None,
            storage=self._run.storage,
        )
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
            record = self._retention.commit(job, step)
            self._exit_if_preempted()
            return record
        if self._staging.nbytes < size:
            _log.info(
                "Allocating %.1f MiB of staging memory for asynchronous saves to %s (pinned for GPU tensors); "
                "this save blocks for the allocation, later saves reuse it.",
                size / 2**20,
                self.directory,
            )
        job = dataclasses.replace(job, planned=self._staging.snapshot(job.planned))  # the only part that blocks
        executor = self._held.executor or self._held.start_thread()
        # The background work holds no reference to the manager, so dropping the manager never waits on it.
        handle = SaveHandle(step, executor.submit(self._retention.commit, job, step))
        self._held.inflight = handle
        if self._held.preempted is not None:
            self.wait()
            self._exit_if_preempted()
        return handle

    def _save_distributed(
        self,
        group: Group,
        step: int,
        metrics: dict[str, Any] | None,
        metadata: dict[str, Any] | None,
        wants_async: bool,
        state: dict[str, Any],
    ) -> CheckpointRecord | SaveHandle:
        """The save of one rank of a distributed job (see the class docstring).

        The ranks first agree: each sends its step, whether a preemption signal
        reached it, its own state (a few small values: this is its snapshot) or
        the error it met getting there; rank 0 sends back one verdict, so that a
        rank that failed early makes every rank raise at once, not after the timeout.
        """
        error: BaseException | None = None
        mine: tuple[int, bool, dict[str, Any]] | None = None
        try:
            self._writer()
            self.wait()  # one save in flight; the staging buffer is free again
            if self.monitor is not None and metrics and self.monitor not in metrics:
                raise InvalidArgumentError(f"metrics= holds {sorted(metrics)} but not monitor={self.monitor!r}.")
            sharded = _sharded({name: obj for name, obj in state.items() if not distributed.is_per_rank(obj)})
            if sharded and (self.compression is not None or self.incremental):
                raise InvalidArgumentError(
                    "compression= and incremental= are not available for sharded (DTensor, FSDP2) state: its pieces "
                    "are written through torch.distributed.checkpoint uncompressed and whole. Build this manager "
                    "without them; nothing was saved."
                )
            own = {n: distributed.rank_state(n, obj) for n, obj in state.items() if distributed.is_per_rank(obj)}
            if self.rng:
                own[RNG_KEY] = RNGState().state_dict()
            mine = (step, self._held.preempted is not None, own)
        except BaseException as exc:
            error = exc
        sent = group.gather(
            f"agreeing on the save of step {step}",
            (mine, None if error is None else f"{type(error).__name__}: {error}"),
        )
        verdict, preempted = None, False
        if sent is not None:
            failed = [f"rank {r}: {message}" for r, (_, message) in enumerate(sent) if message is not None]
            steps = [got[0] for got, _ in sent if got is not None]
            preempted = any(got[1] for got, _ in sent if got is not None)
            if failed:
                verdict = "; ".join(failed)
            elif len(set(steps)) > 1:
                verdict = (
                    f"the ranks saved different steps ({', '.join(f'rank {r}: {s}' for r, s in enumerate(steps))})"
                )
        verdict, preempted = group.broadcast(f"agreeing on the save of step {step}", (verdict, preempted))
        if error is not None:
            raise error
        if verdict is not None:
            raise DistributedError(f"Rank {group.rank} of {group.size}: nothing was saved for step {step}: {verdict}.")
        assert mine is not None
        if preempted and self._held.preempted is None:
            self._held.preempted = signal.SIGTERM  # another rank was signalled: every rank stops after this save
        ranks = None if sent is None else [got[2] for got, _ in sent]
        own = mine[2]
        encoded = {name: _metric(name, value) for name, value in (metrics or {}).items()}
        meta = {"step": step, "metrics": encoded, "metadata": metadata or {}, "ranks": group.size}
        shared = {name: obj for name, obj in state.items() if name not in own}
        key = self._run.key(step)
        if sharded:
            trees = distributed.sharded_states(shared)
            if ranks is not None:
                trees[RANKS_KEY] = ranks
            flat = distributed.flatten_for_dcp(trees)
            if wants_async:
                flat = dataclasses.replace(flat, tensors=self._snapshot_shards(flat.tensors))

            def work() -> CheckpointRecord:
                manifest = distributed.save_sharded(group, self._run.storage, key, flat, meta)
                return self._share_record(
                    group,
                    step,
                    lambda: self._retention.settle(manifest, key, step),  # type: ignore[arg-type]
                )  # (the coordinator, which _share_record runs it on, has the manifest)

        else:
            job = None
            if group.is_coordinator:
                tree = {name: obj.state_dict() if is_stateful(obj) else obj for name, obj in shared.items()}
                tree[RANKS_KEY] = ranks
                job = prepare_save(tree, key, metadata=meta, compression=self.compression,
                                   objects=self._objects.key if self.incremental else None,
                                   storage=self._run.storage)  # fmt: skip
                if wants_async:
                    job = dataclasses.replace(job, planned=self._staging.snapshot(job.planned))

            def work() -> CheckpointRecord:
                return self._share_record(group, step, lambda: self._retention.commit(job, step))  # type: ignore[arg-type]

        self._last_save = time.monotonic()
        if not wants_async:
            record = work()
            self._exit_if_preempted()
            return record
        executor = self._held.executor or self._held.start_thread()
        handle = SaveHandle(step, executor.submit(work))
        self._held.inflight = handle
        if self._held.preempted is not None:
            self.wait()
            self._exit_if_preempted()
        return handle

    def _share_record(self, group: Group, step: int, commit: Any) -> CheckpointRecord:
        """Run ``commit`` on the coordinator and give every rank its record, or every rank an error."""
        record: CheckpointRecord | None = None
        error: BaseException | None = None
        if group.is_coordinator:
            try:
                record = commit()
            except BaseException as exc:
                error = exc
        shared = group.broadcast(
            f"the commit of step {step}", (record, None if error is None else f"{type(error).__name__}: {error}")
        )
        if error is not None:
            raise error
        record, message = shared
        if message is not None:
            raise DistributedError(f"Rank {group.rank} of {group.size}: saving step {step} failed on rank 0: {message}")
        assert record is not None
        return record

    def _snapshot_shards(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copies of this rank's pieces in reused host memory, so that training may change the originals."""
        from torch.distributed.tensor import DTensor

        out: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            held = self._dcp_staging.get(name)
            if held is None or held.shape != local.shape or held.dtype != local.dtype:
                held = torch.empty(local.shape, dtype=local.dtype, pin_memory=local.is_cuda)
                self._dcp_staging[name] = held
            held.copy_(local.detach())
            if isinstance(tensor, DTensor):
                out[name] = DTensor.from_local(
                    held, tensor.device_mesh, tensor.placements, run_check=False, shape=tensor.shape,
                    stride=tensor.stride(),
                )  # fmt: skip
            else:
                out[name] = held
        return out

    def _exit_if_preempted(self) -> None:
        if self._held.preempted is not None:
            self.close()
            raise SystemExit(0)

    def delete(self, step: int) -> None:
        """Delete the checkpoint of ``step`` now, and any stored objects only it referred to (rank 0's job)."""
        if self._group is not None and not self._group.is_coordinator:
            return
        self._writer()
        self.wait()
        key = self._run.key(step)
        if not self._run.storage.exists(key):
            raise CheckpointNotFoundError(f"{self.directory!r} has no checkpoint of step {step}.", path=self.directory)
        self._run.storage.delete(key)
        self._run.forget(step)
        self._objects.sweep()

    # -- listing --------------------------------------------------------------------------

    def list(self) -> list[CheckpointRecord]:
        """Every committed checkpoint, ordered by step (never by file time or name).

        A checkpoint whose manifest cannot be read is left out with a warning.
        Takes no lock.
        """
        return self._run.records()

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
        self,
        step: int | Literal["best"] | None = None,
        *,
        strict: bool = True,
        required: bool = False,
        **state: Any,
    ) -> CheckpointRecord | None:
        """Restore the named states (and the RNG streams) from a checkpoint.

        With no ``step``, the newest checkpoint that reads back whole: a damaged
        or incomplete newer one is skipped with a warning naming it and why (the
        parts not restored are verified first; damage in what is restored is
        found as it streams, and the next checkpoint is then restored over it).
        ``step="best"`` picks the best by ``monitor``.

        Modules stream from the checkpoint straight into their own parameters
        (extra memory near one tensor, compressed or not); other states read
        only their own part of the checkpoint. Every tensor read is verified.
        Takes no lock.

        Args:
            step: a step number, ``"best"``, or None for the newest good one.
            strict: passed to :func:`torchkeep.load_into` for modules and optimizers.
            required: raise :class:`CheckpointNotFoundError` instead of returning None
                when there is no checkpoint (a resume that must not start over).
            **state: the objects to restore, by the names they were saved under:
                Stateful objects are loaded in place, plain dicts updated in place.

        Returns:
            The record restored from, or None when the directory has no checkpoint
            (a fresh start, logged on the ``torchkeep`` logger: at WARNING level when
            the directory does not even exist, which is how a mistyped path shows).

        Raises:
            CheckpointNotFoundError: the given step does not exist.
            CorruptCheckpointError: no checkpoint in the directory verifies.
            StateMismatchError: a named state is not in the checkpoint, or does not fit.
        """
        if self._group is None:
            self.wait()
            records = self.list()
        else:
            records = [*self._agreed_records(step, sorted(state))]
        if step is None:
            candidates = list(reversed(records))
            if not candidates:
                exists = self._run.storage.exists(self._run.prefix) if self._run.prefix else True
                if required:
                    raise CheckpointNotFoundError(
                        f"No checkpoint in {self.directory!r}"
                        + ("" if exists else " (the directory does not exist)")
                        + " to resume from, and restore(required=True) was asked.",
                        path=self.directory,
                    )
                _log.log(
                    logging.INFO if exists else logging.WARNING,
                    "No checkpoint in %s%s: starting fresh.",
                    self.directory,
                    "" if exists else " (the directory does not exist)",
                )
                return None
        elif step == "best":
            if self.monitor is None:
                raise InvalidArgumentError("restore(step='best') needs the manager's monitor= metric.")
            best = best_record(records, self.monitor, self.mode)  # of the records every rank was given
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
        reasons: list[str] = []
        for _ in range(_RESTORE_ROUNDS):
            reasons, vanished = [], 0
            for record in candidates:
                try:
                    read_consistently(
                        self._run.storage,
                        self._run.key(record.step),
                        lambda source, record=record: self._apply(source, state, record, strict),  # type: ignore[misc]
                    )
                except _DAMAGE as err:
                    if step is not None:
                        raise
                    if isinstance(err, CheckpointNotFoundError):
                        vanished += 1  # deleted by a writer's retention since it was listed: not damage
                        _log.debug("Checkpoint step %s went while it was read: %s", record.step, err)
                    else:
                        warnings.warn(
                            f"Skipping checkpoint step {record.step} ({record.path}): {err}",
                            RuntimeWarning,
                            stacklevel=2,
                        )
                    reasons.append(f"step {record.step}: {err}")
                    continue
                return record
            if step is not None or vanished < len(candidates):
                break
            # A writer saving faster than this reader restores deleted every listed step: list again.
            candidates = list(reversed(self.list()))
            if not candidates:
                break
        raise CorruptCheckpointError(
            f"No checkpoint in {self.directory!r} could be restored:\n  " + "\n  ".join(reasons),
            path=self.directory,
        )

    def _agreed_records(self, step: Any, names: Sequence[str]) -> Sequence[CheckpointRecord]:
        """Rank 0's list of checkpoints, on every rank, so that all restore the same one.

        A rank that fails first (a background save's failure re-raised), or that asks for another
        step or other objects than rank 0, makes every rank raise at once.
        """
        assert self._group is not None
        error: BaseException | None = None
        records: Sequence[CheckpointRecord] = ()
        try:
            self.wait()
            records = self.list()
        except BaseException as exc:
            error = exc
        problem = None if error is None else f"{type(error).__name__}: {error}"
        sent = self._group.gather("agreeing on the restore", (problem, step, names))
        failed = [f"rank {r}: {message}" for r, (message, _, _) in enumerate(sent or []) if message is not None]
        asked = {(repr(s), tuple(n)) for _, s, n in sent or []}
        if not failed and len(asked) > 1:
            failed = [
                "the ranks asked for different restores ("
                + ", ".join(f"rank {r}: step={s!r}, {n}" for r, (_, s, n) in enumerate(sent or []))
                + ")"
            ]
        verdict, records = self._group.broadcast("agreeing on the restore", ("; ".join(failed) or None, records))
        if error is not None:
            raise error
        if verdict is not None:
            raise DistributedError(f"Rank {self._group.rank} of {self._group.size}: nothing was restored: {verdict}.")
        return records

    def _apply(self, source: Source, state: dict[str, Any], record: CheckpointRecord, strict: bool) -> None:
        saved = source.top_level_names() or []
        own = {
            name: obj
            for name, obj in state.items()
            if name not in saved and RANKS_KEY in saved and distributed.is_per_rank(obj)
        }
        if own:  # saved per rank by a distributed job: restored from this rank's part
            state = {name: obj for name, obj in state.items() if name not in own}
        if not (isinstance(source, ManifestSource) and source.chunked) and _sharded(state):
            raise StateMismatchError(
                f"Checkpoint {record.path!r} holds whole (unsharded) state, and the model passed is sharded (DTensor "
                "parameters, fully_shard); nothing was restored. Restore into the model before sharding it, then "
                "shard it.",
                report=LoadReport(),
                path=record.path,
            )
        undo = _undoer(own, rng=self.rng and RANKS_KEY in saved)
        try:
            self._apply_rank_state(source, own, saved)  # first: a rank that does not fit touches nothing else
            if isinstance(source, ManifestSource) and source.chunked:
                self._apply_sharded(source, state, saved, record, strict)
            else:
                self._apply_whole(source, state, saved, record, strict)
        except BaseException:
            undo()
            raise

    def _apply_whole(
        self, source: Source, state: dict[str, Any], saved: Sequence[Any], record: CheckpointRecord, strict: bool
    ) -> None:
        missing = [name for name in state if name not in saved]
        if missing:
            shown = [name for name in saved if not str(name).startswith("_torchkeep")]
            raise StateMismatchError(
                f"Checkpoint {record.path!r} has no state named {missing}; it holds {shown}.",
                report=LoadReport(missing=missing),
                path=record.path,
            )
        # The parts nobody asked for are verified first, so a damaged checkpoint is skipped
        # before anything is touched (what is restored is verified as it is read).
        if isinstance(source, ManifestSource):
            wanted = {*state, RNG_KEY} if self.rng else set(state)
            tree = source.manifest.tree
            restored = set().union(*(tensor_names(select_node(tree, n, path=source.path)) for n in wanted & set(saved)))
            others = [e.name for e in source.manifest.tensors if e.name not in restored]
            if others:
                source.read_arrays(verify=True, build=False, names=others)
        # Every object is checked against the checkpoint before any of them is touched.
        values: dict[str, Any] = {}
        for name, obj in state.items():
            if isinstance(obj, (nn.Module, torch.optim.Optimizer)) or is_stateful(obj):
                continue
            if not isinstance(obj, dict):
                raise InvalidArgumentError(
                    f"Cannot restore {name!r} into a {type(obj).__name__}: pass an object with "
                    "load_state_dict(), or a dict to be updated in place.",
                    key=name,
                )
            values[name] = read_source(source, key=name, mmap=False)
            if not isinstance(values[name], dict):
                raise StateMismatchError(
                    f"Checkpoint {record.path!r} holds a {type(values[name]).__name__} under {name!r}, which "
                    f"cannot update the dict passed as {name}=; nothing was restored. Pass "
                    f"{name}=<an object with load_state_dict()>, or read it with torchkeep.load(path)[{name!r}].",
                    report=LoadReport(mismatched=[]),
                    path=record.path,
                )
        for name, obj in state.items():
            if isinstance(obj, (nn.Module, torch.optim.Optimizer)):
                load_into(obj, source, key=name, strict=strict)
            elif name in values:
                obj.clear()
                obj.update(values[name])
            else:
                obj.load_state_dict(read_source(source, key=name, mmap=False))
        if self.rng and RNG_KEY in saved:
            RNGState().load_state_dict(read_source(source, key=RNG_KEY, mmap=False))

    def _apply_sharded(
        self,
        source: ManifestSource,
        state: dict[str, Any],
        saved: Sequence[Any],
        record: CheckpointRecord,
        strict: bool,
    ) -> None:
        """Restore from a checkpoint written by several ranks, through DCP (any number of ranks, or none).

        Names and shapes are checked against the checkpoint before anything is read or touched.
        """
        missing = [name for name in state if name not in saved]
        targets = distributed.sharded_states(state)
        flat = distributed.flatten_for_dcp(targets)
        absent = sorted(name for name in flat.tensors if name not in source.chunked)
        if missing or (absent and strict):
            raise StateMismatchError(
                f"Checkpoint {record.path!r} does not hold {missing or absent[:5]}; it holds "
                f"{[n for n in saved if not str(n).startswith('_torchkeep')]}."
                + ("" if missing else " Pass strict=False to leave those as they are."),
                report=LoadReport(missing=missing or absent),
                path=record.path,
            )
        for name in absent:  # strict=False: what the checkpoint lacks keeps its value
            del flat.tensors[name]
        wrong = [
            Mismatch(name, tuple(t.shape), torch_dtype_name(t.dtype), source.chunked[name].shape,
                     source.chunked[name].dtype)
            for name, t in flat.tensors.items()
            if tuple(t.shape) != source.chunked[name].shape
        ]  # fmt: skip
        if wrong:
            raise StateMismatchError(
                f"Checkpoint {record.path!r} does not fit: {len(wrong)} tensor(s) have another shape, first "
                f"{wrong[0].key!r}: {list(wrong[0].found_shape)} saved, {list(wrong[0].expected_shape)} here; "
                "nothing was restored.",
                report=LoadReport(mismatched=wrong),
                path=record.path,
            )
        self._check_the_rest(source, [*state, RANKS_KEY])
        distributed.load_sharded(self._group, source, flat.tensors)
        loaded: dict[str, Any] = {}
        for name in state:
            node = select_node(source.manifest.tree, name, path=source.path)
            names = tensor_names(node)
            arrays: dict[str, Any] = {n: flat.tensors[n] for n in names if n in flat.tensors}
            rest = [n for n in names if n not in arrays]
            if rest:
                arrays.update(source.arrays_named(rest))
            loaded[name] = decode_tree(node, arrays, path=source.path)
        distributed.apply_sharded(state, loaded, strict=strict)

    def _check_the_rest(self, source: ManifestSource, wanted: Sequence[Any]) -> None:
        """Verify what a sharded restore does not read, before anything is touched; ranks share the work.

        Every rank then knows whether any of them found damage, so all of them skip the checkpoint or none.
        """
        tree = source.manifest.tree
        saved = set(source.top_level_names() or [])
        read = set().union(*(tensor_names(select_node(tree, n, path=source.path)) for n in wanted if n in saved))
        for name in list(read):
            whole = source.chunked.get(name)
            if whole is not None:
                read.update(chunk.entry for chunk in whole.chunks)
        rest = [e.name for e in source.manifest.tensors if e.name not in read]
        rank, size = (0, 1) if self._group is None else (self._group.rank, self._group.size)
        found: str | None = None
        try:
            source.read_arrays(verify=True, build=False, names=rest[rank::size])
        except CorruptCheckpointError as err:
            found = str(err)
        if self._group is not None:
            verdicts = self._group.gather("checking the checkpoint to restore", found)
            found = self._group.broadcast(
                "checking the checkpoint to restore", next((v for v in verdicts or [] if v is not None), None)
            )
        if found is not None:
            raise CorruptCheckpointError(found, path=source.path)

    def _apply_rank_state(self, source: Source, own: dict[str, Any], saved: Sequence[Any]) -> None:
        """This rank's own state (RNG streams, data position) from a checkpoint of a distributed job."""
        if RANKS_KEY not in saved:
            return
        ranks = read_source(source, key=RANKS_KEY, mmap=False)
        rank = 0 if self._group is None else self._group.rank
        if not isinstance(ranks, list) or rank >= len(ranks):
            count = len(ranks) if isinstance(ranks, list) else 0
            warnings.warn(
                f"{source.path!r} was saved by {count} rank(s), so rank {rank} has no state of its own there: its "
                f"RNG streams and data position ({sorted(own) or 'none'}) start afresh.",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        mine = ranks[rank]
        for name, obj in own.items():
            if name not in mine:
                raise StateMismatchError(
                    f"{source.path!r} holds no per-rank state {name!r} for rank {rank}; it holds {sorted(mine)}.",
                    report=LoadReport(missing=[name]),
                    path=source.path,
                )
            distributed.load_rank_state(obj, mine[name])
        if self.rng and RNG_KEY in mine:
            RNGState().load_state_dict(mine[RNG_KEY])
