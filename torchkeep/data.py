"""A sampler that remembers its place, so a resumed run sees exactly the batches it would have seen."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from types import CodeType, FrameType
from typing import Any, Generic, TypeVar

import torch
from torch.utils.data import BatchSampler, Sampler

from torchkeep.errors import InvalidArgumentError

__all__ = ["ResumableSampler", "TrackedLoader"]

T = TypeVar("T")


def _worker_loader_code() -> CodeType | None:
    try:
        from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter
    except ImportError:  # pragma: no cover - a torch without it; the check is then skipped
        return None
    put = getattr(_MultiProcessingDataLoaderIter, "_try_put_index", None)
    return getattr(put, "__code__", None)


# A torch DataLoader with worker processes draws every index from this function, in the main
# process, ahead of what the training loop has received. torchdata's StatefulDataLoader has its
# own copy of it (and records the sampler's state batch by batch), so it is not matched.
_WORKER_LOADER_CODE = _worker_loader_code()


def _drawn_by_worker_loader(frame: FrameType | None) -> bool:
    """Whether ``frame`` (the caller of the sampler's iterator) is inside a multi-worker DataLoader."""
    if _WORKER_LOADER_CODE is None:  # pragma: no cover
        return False
    for _ in range(8):  # sampler <- BatchSampler <- _next_index <- _try_put_index
        if frame is None:
            return False
        if frame.f_code is _WORKER_LOADER_CODE:
            return True
        frame = frame.f_back
    return False


class ResumableSampler(Sampler[int]):
    """Yields dataset indices epoch after epoch, shuffled from ``seed`` and the epoch number, and is Stateful.

    Its state is the epoch and how many indices of that epoch the training
    loop has received. Saved with a checkpoint and restored before the next
    ``iter``, the run continues with the very next sample, in the order an
    uninterrupted run would have seen.

    Pass it as ``sampler=`` to a ``DataLoader`` and give the ``DataLoader`` its
    own ``generator=torch.Generator()``, so that creating an iterator after a
    resume does not draw from the global RNG. With ``num_workers=0`` iterate
    the loader directly: the loader takes an index only when the loop asks for
    the next batch, so the indices handed out are the samples received. With
    ``num_workers > 0`` the loader draws indices ahead of the loop
    (``prefetch_factor * num_workers`` batches), so iterate it through
    :meth:`track`, which counts the batches as the loop receives them; then
    ``state_dict()`` records that count, and leaving the loop early and
    iterating again continues at the first batch not received (the prefetched
    ones are fetched again, not lost). ``state_dict()`` raises
    ``InvalidArgumentError`` rather than record a position ahead of training
    when a multi-worker ``DataLoader`` draws from the sampler without
    :meth:`track`. A ``torchdata`` ``StatefulDataLoader`` records the sampler's
    state batch by batch itself: save the loader, and do not track it.

    In a torch.distributed job each rank takes its own part of every epoch:
    rank ``r`` of ``n`` gets every n-th index of the epoch's order from the
    r-th, all ranks the same number (``length // n``; unlike
    ``DistributedSampler``, which pads by repeating indices, the few left over
    are skipped that epoch), so the ranks step in lockstep. Each rank's position is its own; a CheckpointManager
    saves it per rank.

    Args:
        length: the number of items in the dataset.
        seed: the shuffling seed; the order of epoch ``e`` depends only on ``seed`` and ``e``.
        shuffle: False yields ``0..length-1`` in order.
        num_replicas: how many ranks share the data; by default the world size of an
            initialized torch.distributed job, else 1.
        rank: this rank's share; by default its rank in that job, else 0.

    Example:
        >>> sampler = torchkeep.ResumableSampler(len(data), seed=0)
        >>> loader = DataLoader(data, batch_size=32, sampler=sampler, num_workers=4, generator=torch.Generator())
        >>> manager.restore(model=model, data=sampler)  # before iterating
        >>> for batch in sampler.track(loader):  # one epoch
        ...     step = train_step(batch)
        ...     if manager.should_save(step):
        ...         manager.save(step, model=model, data=sampler)  # the samples received so far
    """

    def __init__(
        self,
        length: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if length < 0:
            raise InvalidArgumentError(f"length must be >= 0, not {length}.")
        joined = torch.distributed.is_available() and torch.distributed.is_initialized()
        if num_replicas is None:
            num_replicas = torch.distributed.get_world_size() if joined else 1
        if rank is None:
            rank = torch.distributed.get_rank() if joined else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise InvalidArgumentError(f"rank must be in [0, num_replicas), not rank={rank} of {num_replicas}.")
        if 0 < length < num_replicas:
            raise InvalidArgumentError(
                f"{length} items cannot be shared by {num_replicas} ranks: each would get none, and its epochs "
                "would be empty. Use fewer ranks, or a larger dataset."
            )
        self.num_replicas = num_replicas
        self.rank = rank
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # indices of this epoch handed out by the current iterator
        # (epoch, position) the loop has received, while a TrackedLoader drives the iteration.
        self._received: tuple[int, int] | None = None
        self._driver: object | None = None  # the TrackedLoader iteration running now, if any
        self._ahead = False  # an untracked multi-worker DataLoader is drawing indices

    def __len__(self) -> int:
        return self.length // self.num_replicas

    def _order(self) -> list[int]:
        if not self.shuffle:
            order = list(range(self.length))
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        if self.num_replicas == 1:
            return order
        return order[self.rank : len(self) * self.num_replicas : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        if self._received is not None:  # a tracked loader drew ahead: go back to what the loop received
            self.epoch, self.position = self._received
        tracked = self._driver is not None
        self._received = (self.epoch, self.position) if tracked else None
        self._ahead = not tracked and _drawn_by_worker_loader(sys._getframe().f_back)
        order = self._order()
        while self.position < len(order):
            index = order[self.position]
            self.position += 1
            yield index
        self.epoch += 1
        self.position = 0

    def track(self, loader: Iterable[T]) -> TrackedLoader[T]:
        """Wraps the ``DataLoader`` this sampler feeds, so that the position counts the batches the loop receives.

        Args:
            loader: a ``torch.utils.data.DataLoader`` built with ``sampler=`` this
                sampler (any ``batch_size`` and ``drop_last``; ``batch_size=None``
                counts one sample per item), or with ``batch_sampler=BatchSampler(sampler, ...)``.

        Returns:
            An iterable over ``loader``'s batches; iterate it once per epoch, as you would ``loader``.

        Raises:
            InvalidArgumentError: ``loader`` is not fed by this sampler, returns batches out of
                order (``in_order=False``), or keeps its own state (a ``StatefulDataLoader``).
        """
        batch_sampler = getattr(loader, "batch_sampler", None)
        if isinstance(batch_sampler, BatchSampler) and batch_sampler.sampler is self:
            batch_size = batch_sampler.batch_size
        elif batch_sampler is None and getattr(loader, "sampler", None) is self:
            batch_size = 1
        else:
            raise InvalidArgumentError(
                "track() needs the DataLoader this sampler feeds: build it with sampler=sampler (and any batch_size)."
            )
        if getattr(loader, "num_workers", 0) > 0 and getattr(loader, "in_order", True) is False:
            raise InvalidArgumentError(
                "track() needs the batches in order: build the DataLoader with in_order=True (the default)."
            )
        if callable(getattr(loader, "state_dict", None)):
            raise InvalidArgumentError(
                f"{type(loader).__name__} records the sampler's position itself: save the loader, do not track it."
            )
        return TrackedLoader(self, loader, batch_size)

    def _received_batch(self, batch_size: int) -> None:
        if self._received is not None:
            epoch, position = self._received
            self._received = (epoch, min(position + batch_size, len(self)))

    def _received_epoch(self) -> None:
        self._received = (self.epoch, self.position)  # the loader ended, so the sampler's epoch ended

    def state_dict(self) -> dict[str, Any]:
        if self._received is not None:
            epoch, position = self._received
        elif self._ahead:
            raise InvalidArgumentError(
                "A DataLoader with worker processes draws indices ahead of training, so this position would skip "
                "samples on resume: iterate the loader through sampler.track(loader)."
            )
        else:
            epoch, position = self.epoch, self.position
        state = {"epoch": epoch, "position": position, "seed": self.seed, "length": self.length}
        if self.num_replicas > 1:
            state.update(num_replicas=self.num_replicas, rank=self.rank)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["length"] != self.length or state["seed"] != self.seed:
            raise InvalidArgumentError(
                f"This sampler covers {self.length} items with seed {self.seed}; the saved one covered "
                f"{state['length']} with seed {state['seed']}. Build it the same way to resume."
            )
        saved = (int(state.get("num_replicas", 1)), int(state.get("rank", 0)))
        if saved != (self.num_replicas, self.rank):
            raise InvalidArgumentError(
                f"This sampler is rank {self.rank} of {self.num_replicas}; the saved one was rank {saved[1]} of "
                f"{saved[0]}, so its position is in another share of the data. Resume on as many ranks, or start "
                "the epoch afresh (do not restore the sampler)."
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._received = None
        self._ahead = False


class TrackedLoader(Generic[T]):
    """A ``DataLoader`` seen through :meth:`ResumableSampler.track`: each batch handed to the loop moves the position.

    The sampler's position advances by the batch's number of indices (``batch_size``,
    or what is left of the epoch for a short last batch) when the batch is handed
    over, and the epoch advances when the loader is exhausted. Iterate it once per
    epoch; ``len()`` is the loader's.

    Args:
        sampler: the sampler that feeds ``loader``.
        loader: the ``DataLoader``.
        batch_size: how many indices each full batch takes from the sampler.
    """

    def __init__(self, sampler: ResumableSampler, loader: Iterable[T], batch_size: int) -> None:
        self.sampler = sampler
        self.loader = loader
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[T]:
        sampler, token = self.sampler, object()
        sampler._driver = token
        try:
            for batch in self.loader:
                sampler._received_batch(self.batch_size)
                yield batch
            sampler._received_epoch()
        finally:
            if sampler._driver is token:
                sampler._driver = None
