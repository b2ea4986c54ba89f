"""The state stored in the golden checkpoints under tests/data/, rebuilt in code."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import torch


def golden_state() -> dict[str, Any]:
    tied = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {
        "model": collections.OrderedDict(
            [
                ("embed.weight", tied),
                ("head.weight", tied),
                ("norm.bias", torch.linspace(-1, 1, 4, dtype=torch.bfloat16)),
                ("steps", torch.tensor(7, dtype=torch.int64)),
                ("mask", torch.tensor([True, False, True])),
                ("half", torch.tensor([0.5, -2.0], dtype=torch.float16)),
                ("f8", torch.tensor([1.0, -0.5], dtype=torch.float8_e4m3fn)),
                ("c128", torch.tensor([1 + 2j], dtype=torch.complex128)),
                ("empty", torch.empty(0, 3)),
            ]
        ),
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.full((3, 4), 0.25)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "name": None}],
        },
        "numbers": [1, -2.5, float("inf"), float("nan"), True, None, 2**70],
        "text": ("torchkeep", b"\x00\x01"),
        "types": [torch.float16, torch.device("cpu"), torch.Size([2, 3])],
        "numpy": {"a": np.arange(5, dtype=np.int16), "s": np.float64(0.125)},
    }


GOLDEN_METADATA = {"purpose": "golden", "version": 1}
