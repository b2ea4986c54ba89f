"""Hugging Face Trainer checkpoints that say when they are complete, and a resume that skips the ones that are not.

The Trainer writes ``checkpoint-N/`` file by file (``model.safetensors``,
``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``, ``trainer_state.json``,
``training_args.bin``...), without fsync and without a mark of completion, and
``transformers.trainer_utils.get_last_checkpoint`` returns the highest ``N``
even when the run was killed halfway through writing it. Here:

- :class:`TorchkeepCallback` seals each checkpoint once the Trainer has
  written it (its ``on_save``): every file is fsync'd and checksummed, then
  ``torchkeep-files.json`` is written last, atomically
  (:func:`torchkeep.formats.fileset.seal_folder`);
- :func:`latest_valid_checkpoint` returns the newest ``checkpoint-N`` that is
  sealed and verifies, for ``trainer.train(resume_from_checkpoint=...)``;
- ``torchkeep.verify`` and ``torchkeep.inspect`` (and the ``torchkeep verify``
  / ``inspect`` commands) work on a sealed ``checkpoint-N``; ``inspect`` says
  which of the Trainer's pickled files (``training_args.bin``,
  ``rng_state.pth``) only the Trainer should unpickle.

Needs the ``transformers`` extra. ``import torchkeep`` never imports
transformers; importing this module does.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

import torch.distributed as dist

from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsupportedFormatError
from torchkeep.formats.fileset import FILESET_NAME, check_sizes, seal_folder, verify_folder
from torchkeep.manifest import check_metadata
from torchkeep.storage import join_key, resolve

try:
    import transformers
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "torchkeep.integrations.transformers needs Hugging Face transformers: pip install 'torchkeep[transformers]'."
    ) from exc

__all__ = ["ENGINE", "TorchkeepCallback", "latest_valid_checkpoint"]

#: The ``engine`` recorded in the seal of a Trainer checkpoint.
ENGINE = "transformers.Trainer"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


class TorchkeepCallback(TrainerCallback):
    """Seal every ``checkpoint-N`` the Trainer saves, so that a half-written one can be told apart.

    After each save (``on_save``), the process that saved (``args.should_save``)
    fsyncs every file of ``output_dir/checkpoint-N`` and writes
    ``torchkeep-files.json`` with the size and xxh3-64 checksum of each, last.
    A checkpoint without it was not finished. Under distributed training every
    process waits at a barrier first, so the files other ranks write
    (``rng_state_1.pth``...) are complete before they are sealed.

    Sealing reads back every byte just written (from the page cache, at
    memory speed) and waits for the disk to hold it (fsync): the time a save
    takes to become durable, which the Trainer alone never waits for.

    Args:
        metadata: plain JSON values to keep in every seal, beside
            ``global_step``, ``epoch`` and the transformers version.

    Example:
        >>> trainer = Trainer(model, args, train_dataset=data, callbacks=[TorchkeepCallback()])
        >>> trainer.train(resume_from_checkpoint=latest_valid_checkpoint(args.output_dir))
    """

    def __init__(self, *, metadata: dict[str, Any] | None = None) -> None:
        self.metadata = check_metadata(metadata)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        _barrier()
        if args.should_save:
            folder = os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}")
            if not os.path.isdir(folder):
                # A hyperparameter search saves under output_dir/run-*/, whose name the callback is not told.
                warnings.warn(
                    f"TorchkeepCallback found no {folder!r} to seal after the Trainer's save (a hyperparameter "
                    "search saves into run folders, which it does not seal); this checkpoint is left unsealed.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            else:
                metadata = {
                    **self.metadata,
                    "global_step": state.global_step,
                    "epoch": state.epoch,
                    "transformers": transformers.__version__,
                }
                seal_folder(folder, engine=ENGINE, metadata=metadata)
        _barrier()  # no process goes on (and saves again, or ends) before the seal is written
        return None


def _barrier() -> None:
    """Wait for every process of a distributed run; nothing when there is one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def latest_valid_checkpoint(output_dir: str | os.PathLike[str], *, verify: bool = True) -> str | None:
    """The newest ``checkpoint-N`` of a Trainer's ``output_dir`` that was sealed complete and verifies.

    Pass it to ``trainer.train(resume_from_checkpoint=...)``: unlike
    ``transformers.trainer_utils.get_last_checkpoint``, which returns the
    highest ``N`` even when it is half-written, a checkpoint without a seal
    (its save was interrupted, or made without :class:`TorchkeepCallback`) or
    whose files fail their seal (truncated, overwritten, deleted) is skipped,
    with a warning saying why, and the next older one is tried.

    Args:
        output_dir: the Trainer's ``output_dir``.
        verify: re-read every byte against the seal (default). ``False`` checks
            only that the seal is intact and each file has its sealed size.

    Returns:
        The checkpoint's path, or None when there is none to resume from (no
        ``output_dir`` yet, or no good checkpoint in it): ``resume_from_checkpoint=None``
        starts afresh.
    """
    storage, key = resolve(output_dir)
    if not storage.exists(key) or not storage.is_dir(key):
        return None
    steps = sorted(
        ((int(match.group(1)), name) for name in storage.list(key) if (match := _CHECKPOINT.fullmatch(name))),
        reverse=True,
    )
    for _, name in steps:
        folder = join_key(key, name)
        if not storage.is_dir(folder):
            continue
        try:
            if verify:
                verify_folder(folder, storage=storage)
            else:
                check_sizes(storage, folder)
        except CheckpointNotFoundError:
            if storage.exists(folder):
                _skip(storage.describe(folder), f"it has no {FILESET_NAME}: its save did not finish, or ran "
                      "without TorchkeepCallback")  # fmt: skip
            continue
        except (CorruptCheckpointError, UnsupportedFormatError) as err:
            _skip(storage.describe(folder), str(err))
            continue
        return storage.describe(folder)
    return None


def _skip(path: str, why: str) -> None:
    warnings.warn(f"Skipping Trainer checkpoint {path}: {why}", RuntimeWarning, stacklevel=3)
