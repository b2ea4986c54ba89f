"""The snapshot stage: copy a planned state into one reusable host buffer, so training can go on.

The buffer is laid out exactly as the shard's data (the plan orders tensors by
alignment), so each tensor's staged copy is a view of it, and the writer
writes straight from those views with no further copy. For tensors on a GPU
the buffer is pinned and the copies run on a side stream, synchronized before
the snapshot returns.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch

from torchkeep.formats.shard import PlannedTensor, leaf_bytes
from torchkeep.tree import ArrayLeaf

__all__ = ["StagingBuffer"]

# Dtypes copied as themselves; the rarer ones (float4, bits, sub-byte ints) are copied as bytes.
_TYPED_COPY = {
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
}  # fmt: skip


class StagingBuffer:
    """One host buffer, sized to the largest state seen and reused by every snapshot.

    Not thread-safe, and a snapshot's views are valid only until the next
    snapshot: the caller writes one snapshot before taking the next.
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self.allocations = 0  # how many times memory was (re)allocated; stays 1 for a steady state

    @property
    def nbytes(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel()

    def _ensure(self, nbytes: int, pinned: bool) -> torch.Tensor:
        if self._buffer is None or self._buffer.numel() < nbytes or (pinned and not self._buffer.is_pinned()):
            self._buffer = None  # free the old buffer first
            self._buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pinned)
            self.allocations += 1
        return self._buffer

    def snapshot(self, planned: list[PlannedTensor]) -> list[PlannedTensor]:
        """Copy every planned tensor into the buffer; return the plan with the copies as its leaves."""
        total = sum(p.nbytes for p in planned)
        on_gpu = [p for p in planned if isinstance(p.leaf.value, torch.Tensor) and p.leaf.value.is_cuda]
        buffer = self._ensure(total, pinned=bool(on_gpu))
        stream = None
        if on_gpu:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())  # see the training step's last writes
        staged: list[PlannedTensor] = []
        offset = 0
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for p in planned:
                region = buffer[offset : offset + p.nbytes]
                offset += p.nbytes
                value = p.leaf.value
                if isinstance(value, torch.Tensor):
                    source = value.detach().resolve_conj().resolve_neg()
                    if not source.is_contiguous():
                        source = source.contiguous()
                    typed = region.view(value.dtype).reshape(value.shape)
                    if p.nbytes and value.dtype in _TYPED_COPY:
                        typed.copy_(source, non_blocking=source.is_cuda)  # torch copies fastest in the real dtype
                    elif p.nbytes:
                        region.copy_(source.reshape(-1).view(torch.uint8), non_blocking=source.is_cuda)
                    copy: torch.Tensor | np.ndarray = typed
                else:
                    target = region.numpy()
                    target[:] = np.frombuffer(leaf_bytes(value), dtype=np.uint8)
                    copy = target.view(value.dtype).reshape(value.shape)
                staged.append(dataclasses.replace(p, leaf=ArrayLeaf(p.name, copy)))
        if stream is not None:
            stream.synchronize()
        return staged
