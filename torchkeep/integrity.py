"""Per-tensor checksums: fast enough to run on every save and every load."""

from __future__ import annotations

import xxhash

__all__ = ["CHECKSUM_ALGORITHM", "checksum", "new_checksum"]

#: The algorithm named in manifests. xxh3 hashes at memory speed, far above any disk.
CHECKSUM_ALGORITHM = "xxh3-64"


def checksum(data: bytes | bytearray | memoryview) -> str:
    """The hex xxh3-64 digest of a buffer, read in place without copying."""
    return xxhash.xxh3_64_hexdigest(data)


def new_checksum() -> xxhash.xxh3_64:
    """A streaming hasher: ``update`` it piece by piece; its ``hexdigest()`` equals :func:`checksum` of the whole."""
    return xxhash.xxh3_64()
