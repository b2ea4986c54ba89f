"""Progress reports for long reads and writes: ``progress(done_bytes, total_bytes)``.

A callback is called from the thread doing the work, after each piece, and
once more with ``done == total`` at the end. Writes count the bytes handed to
the storage against the tensors' uncompressed size, so a compressed save ends
by jumping to the total.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, BinaryIO, cast

from torchkeep.storage import Storage, Transaction

__all__ = ["Progress", "Tally", "counting_storage"]

#: ``progress(done_bytes, total_bytes)``.
Progress = Callable[[int, int], None]


class Tally:
    """Bytes done out of a total, reported to a callback as they grow (thread-safe)."""

    def __init__(self, total: int, report: Progress) -> None:
        self.total = total
        self.done = 0
        self._report = report
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.done = min(self.total, self.done + n)
            done = self.done
        self._report(done, self.total)

    def finish(self) -> None:
        self.done = self.total
        self._report(self.total, self.total)


class _CountingFile:
    def __init__(self, inner: BinaryIO, tally: Tally) -> None:
        self._inner = inner
        self._tally = tally

    def write(self, data: Any) -> int:
        n = self._inner.write(data)
        self._tally.add(n if n is not None else len(memoryview(data).cast("B")))
        return n

    def __enter__(self) -> _CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _CountingTransaction:
    def __init__(self, inner: Transaction, tally: Tally) -> None:
        self._inner = inner
        self._tally = tally
        self.key = inner.key

    def open(self, name: str = "") -> BinaryIO:
        return cast(BinaryIO, _CountingFile(self._inner.open(name), self._tally))

    def commit(self) -> None:
        self._inner.commit()

    def abort(self) -> None:
        self._inner.abort()

    def __enter__(self) -> _CountingTransaction:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._inner.__exit__(kind, exc, tb)


class _CountingStorage:
    """A storage that counts the bytes written through it; everything else goes to the storage it wraps."""

    def __init__(self, inner: Storage, tally: Tally) -> None:
        self._inner = inner
        self._tally = tally

    def begin(self, key: str, *, directory: bool) -> Transaction:
        return cast(Transaction, _CountingTransaction(self._inner.begin(key, directory=directory), self._tally))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def counting_storage(storage: Storage, tally: Tally) -> Storage:
    """``storage``, with the bytes written through it added to ``tally``."""
    return cast(Storage, _CountingStorage(storage, tally))
