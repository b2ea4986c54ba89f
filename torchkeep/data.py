"""A sampler that remembers its place, so a resumed run sees exactly the batches it would have seen."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from torchkeep.errors import InvalidArgumentError

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler[int]):
    """Yields dataset indices epoch after epoch, shuffled from ``seed`` and the epoch number, and is Stateful.

    Its state is the epoch and how many indices of that epoch have been handed
    out. Saved with a checkpoint and restored before the next ``iter``, the
    run continues with the very next index. Pass it as ``sampler=`` to a
    ``DataLoader`` with ``num_workers=0`` (workers fetch ahead, so the position
    would run ahead of training), and give the ``DataLoader`` its own
    ``generator=torch.Generator()`` so that creating an iterator after a resume
    does not draw from the global RNG. For multi-worker loading use a
    ``torchdata.stateful_dataloader.StatefulDataLoader`` instead: it is
    Stateful too, so a manager saves it the same way.

    Args:
        length: the number of items in the dataset.
        seed: the shuffling seed; the order of epoch ``e`` depends only on ``seed`` and ``e``.
        shuffle: False yields ``0..length-1`` in order.
    """

    def __init__(self, length: int, *, seed: int = 0, shuffle: bool = True) -> None:
        if length < 0:
            raise InvalidArgumentError(f"length must be >= 0, not {length}.")
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return self.length

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.length))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.length, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        while self.position < self.length:
            index = order[self.position]
            self.position += 1
            yield index
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "length": self.length}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["length"] != self.length or state["seed"] != self.seed:
            raise InvalidArgumentError(
                f"This sampler covers {self.length} items with seed {self.seed}; the saved one covered "
                f"{state['length']} with seed {state['seed']}. Build it the same way to resume."
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
