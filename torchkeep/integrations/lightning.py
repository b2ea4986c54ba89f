"""PyTorch Lightning: a ``CheckpointIO`` plugin that writes torchkeep checkpoints.

``Trainer(plugins=[TorchkeepCheckpointIO()])`` keeps everything Lightning does
around checkpoints (the user's ``ModelCheckpoint`` picks names, ranks them and
removes the ones past ``save_top_k``; ``fit(ckpt_path="last")`` resumes) and
changes only how the bytes are written and read:

- each checkpoint Lightning names (``epoch=3-step=120.ckpt``, ``last.ckpt``)
  becomes a native torchkeep checkpoint *directory* under that exact name,
  committed atomically, with a checksum on every tensor, without pickle,
  optionally zstd-compressed;
- ``async_save=True`` holds training up only while the tensors are copied into
  a staging buffer; the write and the commit run on a background thread;
- loading verifies every byte; a ``.ckpt`` file written by plain Lightning
  (a torch zip) loads too, after the static pickle scan and through torch's
  ``weights_only`` unpickler.

This module imports Lightning; ``import torchkeep`` does not. Importing it
registers ``argparse.Namespace`` and Lightning's ``AttributeDict`` with
:func:`torchkeep.register_type` (unless already registered), so hyper-parameters
holding them are saved as their attributes and come back as the same classes
wherever this module is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from torchkeep.compression import Compression
from torchkeep.errors import (
    CheckpointExistsError,
    InvalidArgumentError,
    UnsafeCheckpointError,
    UnsupportedObjectError,
)
from torchkeep.extensions import by_class, by_name, register_type
from torchkeep.formats.detect import Format
from torchkeep.formats.native import DEFAULT_MAX_SHARD_SIZE
from torchkeep.formats.shard import plan_tensors
from torchkeep.gcpause import paused_gc
from torchkeep.loading import load
from torchkeep.manifest import MANIFEST_NAME
from torchkeep.saving import SaveJob, write_job
from torchkeep.snapshot import StagingBuffer
from torchkeep.storage import Storage, join_key, resolve
from torchkeep.tree import encode_tree

try:
    from lightning.fabric.plugins import CheckpointIO
    from lightning.fabric.utilities.data import AttributeDict
except ImportError as exc:
    raise ImportError(
        "torchkeep.integrations.lightning needs the lightning package: pip install 'torchkeep[lightning]'."
    ) from exc

__all__ = ["TorchkeepCheckpointIO"]

_THREAD = "torchkeep-lightning-save"
_ZIP_MAGIC = b"PK\x03\x04"
_HPARAM = re.compile(r'^checkpoint\["hyper_parameters"\]\[("(?:[^"\\]|\\.)*")\]')


def _register_types() -> None:
    """Let checkpoints hold ``argparse.Namespace`` and ``AttributeDict`` losslessly, as their attributes."""
    known: list[tuple[type, str, Any, Any]] = [
        (argparse.Namespace, "argparse.Namespace", lambda ns: dict(vars(ns)), lambda d: argparse.Namespace(**d)),
        (AttributeDict, "lightning.AttributeDict", dict, AttributeDict),
    ]
    for cls, name, to_tree, from_tree in known:
        if by_class(cls) is None and by_name(name) is None:
            register_type(cls, name=name, to_tree=to_tree, from_tree=from_tree)


_register_types()


class TorchkeepCheckpointIO(CheckpointIO):
    """Lightning's checkpoint files as crash-safe, checksummed, pickle-free torchkeep checkpoints.

    Pass it to the Trainer next to your own ``ModelCheckpoint``::

        trainer = Trainer(
            plugins=[TorchkeepCheckpointIO()],
            callbacks=[ModelCheckpoint(monitor="val_loss", save_top_k=2, save_last=True)],
        )
        trainer.fit(model, ckpt_path="last")

    Each path Lightning saves to becomes a torchkeep checkpoint directory with
    that name (``last.ckpt/manifest.json`` and its shards): ``torchkeep.load``,
    ``torchkeep verify`` and ``trainer.fit/validate/test(ckpt_path=...)`` read
    it. ``LightningModule.load_from_checkpoint`` opens files with ``torch.load``
    and cannot; load the dict with :meth:`load_checkpoint` instead.

    Call order (Lightning's): ``save_checkpoint`` for each checkpoint,
    ``remove_checkpoint`` for each one ``ModelCheckpoint`` drops,
    ``load_checkpoint`` when a run resumes or evaluates a checkpoint, and
    ``teardown`` at the end of ``fit``/``validate``/``test``, which waits for a
    background save.

    Args:
        compression: ``"zstd"``, ``"zstd:LEVEL"`` or a :class:`torchkeep.Compression`
            (needs the ``zstd`` extra); None (default) writes uncompressed.
        async_save: write in the background. ``save_checkpoint`` returns once the
            tensors are copied into a staging buffer (reused by every save);
            training may change them at once, and the checkpoint holds the values
            of the call. One save is in flight at a time: the next
            ``save_checkpoint`` first waits for it. A failed background save is
            raised by the next ``save_checkpoint``, ``load_checkpoint``, :meth:`wait`
            or ``teardown``. A checkpoint ``ModelCheckpoint`` drops while a save is
            in flight is removed only after that save has committed, and kept if
            it failed. Outside ``fit`` (``trainer.save_checkpoint`` after it), call
            :meth:`wait` before reading the checkpoint.
        verify: check every tensor's checksum on load (default).
        trust: let :meth:`load_checkpoint` unpickle a ``.ckpt`` file holding Python
            objects beyond tensors and containers (torchkeep warns; it runs any code
            in the file). Only for files you wrote yourself. Lightning's own
            ``weights_only=False`` does not do this.
        max_shard_size: bytes of tensor data per shard file.

    Concurrency: one plugin serves one Trainer; its methods are called from the
    training thread. Thread-safe against its own background save only.
    """

    def __init__(
        self,
        *,
        compression: str | Compression | None = None,
        async_save: bool = False,
        verify: bool = True,
        trust: bool = False,
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    ) -> None:
        super().__init__()
        if type(max_shard_size) is not int or max_shard_size <= 0:
            raise InvalidArgumentError(f"max_shard_size must be a positive int of bytes, not {max_shard_size!r}.")
        self.compression = Compression.parse(compression)
        self.async_save = bool(async_save)
        self.verify = bool(verify)
        self.trust = bool(trust)
        self.max_shard_size = max_shard_size
        self._staging = StagingBuffer()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future[Any]] = []  # background writes and removals, in order
        self._writing: Future[Any] | None = None  # the newest of the pending writes
        self._lock = threading.Lock()

    # -- Lightning's CheckpointIO ---------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Save Lightning's checkpoint dict as a native torchkeep checkpoint directory at ``path``.

        Raises:
            UnsupportedObjectError: a value cannot be saved without pickle; the message names
                its key in the checkpoint and how to fix it. Nothing is written.
            CheckpointExistsError: ``path`` holds something that is not a checkpoint.
            InvalidArgumentError: ``storage_options`` was given (torchkeep takes its options here).
            StorageError: writing failed (raised at once, or by the next call when saving asynchronously).
        """
        if storage_options is not None:
            raise InvalidArgumentError(
                f"storage_options={storage_options!r} is not used by TorchkeepCheckpointIO; set compression and "
                "async_save on TorchkeepCheckpointIO(...) instead."
            )
        self.wait()  # the previous save has committed (or raised) and the staging buffer is free
        job = self._plan(checkpoint, path)
        if not self.async_save:
            write_job(job)
            return
        staged = replace(job, obj=None, planned=self._staging.snapshot(job.planned))  # the only part that blocks
        self._writing = self._submit(write_job, staged)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load a checkpoint Lightning can resume from: a torchkeep checkpoint, or a ``.ckpt`` from plain Lightning.

        Every tensor is read into memory (not mapped) and verified. Tensors go to
        the CPU unless ``map_location`` (as for :func:`torchkeep.load`) says
        otherwise; Lightning moves them to the model's device. ``weights_only`` is
        accepted for Lightning's sake: torchkeep never unpickles more than torch's
        ``weights_only`` loader unless the plugin was built with ``trust=True``.

        Raises:
            CheckpointNotFoundError: nothing committed at ``path`` (a ``FileNotFoundError``).
            ChecksumMismatchError: damaged tensor bytes; the message names the checkpoint and tensors.
            CorruptCheckpointError: a damaged manifest or file.
            UnsafeCheckpointError: a ``.ckpt`` holding pickled objects, without ``trust=True``.
        """
        self.wait()
        try:
            loaded = load(path, map_location=map_location, verify=self.verify, trust=self.trust, mmap=False)
        except UnsafeCheckpointError as err:
            raise UnsafeCheckpointError(
                f"{err.message} With Lightning, trust it with Trainer(plugins=[TorchkeepCheckpointIO(trust=True)]).",
                path=err.path,
                key=err.key,
            ) from err
        return loaded

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the checkpoint at ``path`` (directory or file); nothing there is not an error.

        While a save is in flight the removal waits behind it on the background
        thread, and is skipped if that save failed: a checkpoint is never removed
        before the one replacing it is committed.
        """
        storage, key = resolve(path)
        with self._lock:
            writing = self._writing
        if writing is None:
            storage.delete(key)
            return
        self._submit(_delete_after, writing, storage, key)

    def teardown(self) -> None:
        """Wait for the save in flight (re-raising its failure) and stop the background thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    # -- torchkeep's own --------------------------------------------------------------------

    def wait(self) -> None:
        """Block until every background save and removal has finished; re-raise the first failure."""
        with self._lock:
            pending, self._pending, self._writing = self._pending, [], None
        failure: BaseException | None = None
        for future in pending:
            error = future.exception()
            if error is not None and failure is None:
                failure = error
        if failure is not None:
            raise failure

    def _submit(self, fn: Any, *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` on the background thread, after everything submitted before it."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_THREAD)
        future = self._executor.submit(fn, *args)
        with self._lock:
            self._pending.append(future)
        return future

    def _plan(self, checkpoint: dict[str, Any], path: Any) -> SaveJob:
        """Validate and lay out a save to a native directory at exactly ``path``, ``.ckpt`` name and all."""
        storage, key = resolve(path)
        where = storage.describe(key)
        try:
            with paused_gc():
                tree, leaves = encode_tree(checkpoint)
                planned = plan_tensors(leaves)
        except UnsupportedObjectError as err:
            raise _refusal(err, where) from err
        _check_replaceable(storage, key)
        local = storage.local_path(key)
        if local is not None:  # Lightning may link to the checkpoint before a background save has made its folder
            os.makedirs(os.path.dirname(local), exist_ok=True)
        return SaveJob(
            storage, key, Format.NATIVE, checkpoint, tree, planned, _metadata(checkpoint),
            self.max_shard_size, self.compression,
        )  # fmt: skip


def _delete_after(write: Future[Any], storage: Storage, key: str) -> None:
    """Delete ``key`` once the save before it committed; keep it if that save failed."""
    if write.exception() is None:
        storage.delete(key)


def _metadata(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Lightning's epoch and global step, for ``torchkeep inspect`` and ``torchkeep ls``."""
    found = {k: checkpoint.get(k) for k in ("epoch", "global_step")}
    return {"lightning": {k: v for k, v in found.items() if type(v) is int}}


def _check_replaceable(storage: Storage, key: str) -> None:
    """Refuse to replace what is neither a checkpoint nor empty: torchkeep's, or a torch zip Lightning wrote."""
    if not storage.exists(key):
        return
    where = storage.describe(key)
    if storage.is_dir(key):
        if not storage.list(key) or storage.exists(join_key(key, MANIFEST_NAME)):
            return
        raise CheckpointExistsError(
            f"{where!r} is a directory that is not a torchkeep checkpoint, and Lightning asked to save a "
            "checkpoint there; it is left untouched. Remove it, or give ModelCheckpoint another dirpath.",
            path=where,
        )
    if storage.read(key, 0, len(_ZIP_MAGIC)) == _ZIP_MAGIC:
        return  # a .ckpt plain Lightning wrote: replaced, as Lightning itself would
    raise CheckpointExistsError(
        f"{where!r} is a file that is not a torch checkpoint, and Lightning asked to save a checkpoint there; "
        "it is left untouched. Remove it, or give ModelCheckpoint another dirpath.",
        path=where,
    )


def _refusal(err: UnsupportedObjectError, where: str) -> UnsupportedObjectError:
    """The tree's refusal, said in Lightning's terms: the checkpoint key, and the fix for where it came from."""
    key = err.key or "checkpoint"
    if key.startswith("state"):
        key = "checkpoint" + key[len("state") :]
    why = err.message.removeprefix(f"Cannot save {err.key}: ") if err.key else err.message
    match = _HPARAM.match(key)
    if match is not None:
        name = json.loads(match.group(1))
        fix = (
            f"It is the hyper-parameter {name!r} that save_hyperparameters() recorded. Pass plain values "
            "(numbers, strings, lists, dicts, tensors), make its class a dataclass (saved as its fields; "
            "torchkeep.register_type(TheClass) where you load brings the class back), register the class with "
            f"torchkeep.register_type(TheClass, to_tree=..., from_tree=...), or leave it out with "
            f"self.save_hyperparameters(ignore=[{name!r}])."
        )
    else:
        fix = (
            "Lightning took it from a state_dict() or on_save_checkpoint() of your LightningModule, "
            "DataModule or a callback: keep plain values there, or register the class with torchkeep.register_type."
        )
    return UnsupportedObjectError(
        f"Cannot save {key} of the Lightning checkpoint {where!r}: {why} {fix} Nothing was written.",
        path=where,
        key=key,
    )
