"""Pausing the cycle collector while a checkpoint's many small objects are built or parsed.

Reading or planning a checkpoint of tens of thousands of tensors allocates a
few objects per tensor, none of them in a reference cycle. Each allocation
counts towards the collector's thresholds, so the collector runs again and
again over every object the program holds, and a load of 10,000 small tensors
spent about half its time there. Pausing it for the few milliseconds of such
work, and restoring it after, changes no program's behaviour but that one.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["paused_gc"]


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cycle collector for the block; re-enable it after only if it was enabled before."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
