"""Compression options and the byte shuffle that makes floating-point data compressible."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from torchkeep.errors import InvalidArgumentError

__all__ = ["Compression", "compressor", "decompress", "shuffle", "unshuffle"]


@dataclass(frozen=True)
class Compression:
    """How a native checkpoint's tensors are compressed.

    Args:
        codec: ``"zstd"`` (the only codec).
        level: zstd level, 1 (fastest) to 22. On shuffled weights and optimizer state
            higher levels barely shrink the data further (see benchmarks/RESULTS.md),
            so the default is 1.
        shuffle: byte-shuffle tensors of multi-byte dtypes first (all the first bytes
            of the elements, then all the second bytes, ...), which lets zstd find
            the redundancy in exponents and sign bits. A tensor over 256 KiB is
            shuffled only if that shrinks a sample of it (mostly-zero data compresses
            better unshuffled); the manifest records the choice per tensor.
    """

    codec: str = "zstd"
    level: int = 1
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.codec != "zstd":
            raise InvalidArgumentError(f"Unknown compression codec {self.codec!r}; torchkeep knows 'zstd'.")
        if type(self.level) is not int or not 1 <= self.level <= 22:
            raise InvalidArgumentError(f"zstd level must be an int from 1 to 22, not {self.level!r}.")

    @classmethod
    def parse(cls, value: str | Compression | None) -> Compression | None:
        """``None``, ``"zstd"``, ``"zstd:9"`` or a :class:`Compression`."""
        if value is None or isinstance(value, Compression):
            return value
        if isinstance(value, str):
            codec, _, level = value.partition(":")
            if codec != "zstd":
                raise InvalidArgumentError(
                    f"compression={value!r}: unknown codec {codec!r}; torchkeep compresses with 'zstd' "
                    "(or 'zstd:LEVEL', LEVEL from 1 to 22)."
                )
            if not level:
                return cls(codec)
            if not level.isdigit():
                raise InvalidArgumentError(
                    f"compression={value!r}: the level after ':' must be an integer from 1 to 22."
                )
            return cls(codec, int(level))
        raise InvalidArgumentError(f"compression must be None, 'zstd', 'zstd:LEVEL' or a Compression, not {value!r}.")


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError:
        raise InvalidArgumentError(
            "Compressed checkpoints need the zstandard package: pip install 'torchkeep[zstd]'."
        ) from None
    return zstandard


def compressor(level: int, threads: int = 0) -> Any:
    """A zstd compressor (reusable on one thread); ``threads`` > 0 splits one large frame across threads."""
    return _zstd().ZstdCompressor(level=level, threads=threads)


def decompress(frame: bytes | memoryview, size: int) -> bytes:
    """Decompress one frame that must hold exactly ``size`` bytes (a lie is caught, not allocated)."""
    zstd = _zstd()
    return zstd.ZstdDecompressor().decompress(frame, max_output_size=size)


def shuffle(data: memoryview, itemsize: int) -> bytes | memoryview:
    """Group the bytes of ``itemsize``-byte elements by position (a no-op for 1-byte elements)."""
    if itemsize <= 1 or len(data) % itemsize:
        return data
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, itemsize).T.tobytes()


def unshuffle(data: bytes, itemsize: int) -> memoryview:
    """Undo :func:`shuffle`, into a new writable buffer."""
    if itemsize <= 1 or len(data) % itemsize:
        return memoryview(bytearray(data))
    return np.frombuffer(data, dtype=np.uint8).reshape(itemsize, -1).T.copy().reshape(-1).data
