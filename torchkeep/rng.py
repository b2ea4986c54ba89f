"""The random number generators a training run draws from, saved and restored as one Stateful."""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["RNGState"]


class RNGState:
    """Python's ``random``, numpy's global generator, torch's CPU generator and every CUDA device's.

    CUDA states are captured only when CUDA has been initialized, so saving
    never starts CUDA by itself. Restoring onto a machine with a different
    number of GPUs restores what matches and warns.
    """

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"].cpu())
        cuda = state.get("cuda")
        if cuda:
            available = torch.cuda.device_count() if torch.cuda.is_available() else 0
            for i, s in enumerate(cuda[:available]):
                torch.cuda.set_rng_state(s.cpu(), i)
            if available != len(cuda):
                warnings.warn(
                    f"The checkpoint holds RNG states of {len(cuda)} CUDA device(s) and this machine has "
                    f"{available}; {min(available, len(cuda))} were restored, so GPU randomness will differ.",
                    stacklevel=2,
                )
