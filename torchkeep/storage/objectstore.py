"""Checkpoints in an object store (S3 and any fsspec filesystem), committed without a rename.

An object store has no rename and no directories, so a directory entry (a
native checkpoint, a registry version) is laid out so that one small object
decides whether it exists::

    run/step-00000010                          the commit marker: {"torchkeep-entry": 1, "generation": "G", ...}
    run/.tk-data/step-00000010/G/manifest.json the entry's objects, generation G
    run/.tk-data/step-00000010/G/data-00000.safetensors

A writer uploads every object of a new generation under ``.tk-data`` (which is
never listed), then creates the marker only if it is absent (``If-None-Match:
*``), or, replacing an entry, only if it is still the marker it read
(``If-Match``), and then removes the generation it replaced. So a listing shows
whole entries only, two writers can never both commit one entry (the second
gets :class:`~torchkeep.errors.CheckpointExistsError`), and a killed upload
leaves only an unreferenced generation, removed by a later writer once it is
older than :data:`STALE_AFTER_S`. Deleting removes the marker first, then the
data. A single-object entry (a ``.safetensors`` or ``.pth`` file) is one PUT,
which the store publishes whole.

Reads of an entry's objects go to the generation its marker names, remembered
per entry; a generation is never changed once committed, so a remembered one
can only go missing (replaced and removed), and is then looked up again.

Every call is retried on transient failures (throttling, 5xx, a connection
reset) with exponential backoff and jitter, never on a failed precondition or
a missing object. Credentials, endpoint and region come from the standard AWS
environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, profiles...) as
boto3 reads them; ``storage_options`` override them and are never logged.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import io
import json
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, TypeVar

from torchkeep.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidArgumentError,
    StorageError,
    TorchkeepError,
)
from torchkeep.manifest import utc_now
from torchkeep.storage.base import TransactionBase, check_open, join_key, parent_key, split_key

__all__ = ["STALE_AFTER_S", "Lease", "ObjectStorage", "observe_transfers", "open_filesystem"]

_T = TypeVar("_T")

#: The folder, beside the entries, that holds every entry's generations; never listed.
DATA = ".tk-data"
#: An unreferenced generation (a killed upload) older than this is removed by the next writer.
STALE_AFTER_S = 3600.0
_MARKER_KEY = "torchkeep-entry"
_MAX_MARKER_BYTES = 4096
_PIECE = 16 * 1024 * 1024
#: An object up to this size is sent in one PUT (kept in memory until then); a larger one in parts.
_SINGLE_PUT = 64 * 1024 * 1024
#: The part size of a multipart upload to S3, and how many parts are sent at once.
_PART = 32 * 1024 * 1024
_PARALLEL_PARTS = 4
# Objects of one save sent at once (each up to _SINGLE_PUT bytes held until its PUT is answered).
_PARALLEL_PUTS = 4
_PARALLEL = 8
_ATTEMPTS = 6


_swept: set[tuple[str, str]] = set()  # (protocol, folder) swept of leftovers by this process
_swept_lock = threading.Lock()
_observers: list[Callable[[str, int], None]] = []
_observers_lock = threading.Lock()


@contextlib.contextmanager
def observe_transfers(callback: Callable[[str, int], None]) -> Iterator[None]:
    """Call ``callback(direction, nbytes)`` (``"up"`` or ``"down"``) for every piece moved to or from any store.

    For progress displays: the command line shows uploads and downloads with it.
    """
    with _observers_lock:
        _observers.append(callback)
    try:
        yield
    finally:
        with _observers_lock:
            _observers.remove(callback)


def _moved(direction: str, nbytes: int) -> None:
    if _observers:
        for callback in list(_observers):
            callback(direction, nbytes)


def open_filesystem(protocol: str, storage_options: dict[str, Any] | None = None) -> Any:
    """The fsspec filesystem for ``protocol``, with listings never cached (other writers change them).

    Raises:
        InvalidArgumentError: fsspec, or the package for this protocol, is not installed.
    """
    try:
        import fsspec
    except ImportError:
        raise InvalidArgumentError(
            f"{protocol}:// needs fsspec: pip install 'torchkeep[s3]' (or fsspec and the package for {protocol})."
        ) from None
    options = {"use_listings_cache": False, "skip_instance_cache": True, **(storage_options or {})}
    try:
        return fsspec.filesystem(protocol, **options)
    except ImportError as exc:
        extra = "s3" if protocol in ("s3", "s3a") else protocol
        raise InvalidArgumentError(
            f"{protocol}:// needs a package that is not installed ({exc}); for S3: pip install 'torchkeep[{extra}]'."
        ) from None
    except ValueError as exc:
        raise InvalidArgumentError(f"fsspec knows no filesystem {protocol!r}: {exc}") from None


def _precondition_failed(exc: BaseException) -> bool:
    """Whether a conditional write was refused (the object exists, or is no longer what was read)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, FileExistsError):
            return True
        response = getattr(seen, "response", None)
        code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or "pre-condition" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}  # fmt: skip
_TRANSIENT_WORDS = ("slow down", "slowdown", "reduce your request rate", "throttl", "service unavailable",
                    "internal error", "connection", "reset by peer", "timed out", "timeout", "broken pipe",
                    "temporarily", "server disconnected")  # fmt: skip


def _transient(exc: BaseException) -> bool:
    """Worth another try: throttling, a server error, a dropped or reset connection (anywhere in the chain)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if _precondition_failed(exc) or isinstance(exc, TorchkeepError):
        return False
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (ConnectionError, TimeoutError)):
            return True
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
                return True
        text = f"{type(seen).__name__} {seen}".lower()
        if any(word in text for word in _TRANSIENT_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class ObjectStorage:
    """Checkpoints under ``root`` of an fsspec filesystem (``s3://bucket/run`` → ``bucket/run``).

    Args:
        protocol: the URL scheme (``s3``, ``gcs``, ``az``, ``memory``...).
        root: the bucket and folder that keys are relative to.
        storage_options: options for the filesystem (endpoint, credentials...);
            by default the standard environment of the store's own client.
        fs: an fsspec filesystem to use instead of making one.
    """

    def __init__(
        self,
        protocol: str,
        root: str,
        *,
        storage_options: dict[str, Any] | None = None,
        fs: Any = None,
    ) -> None:
        self.protocol = protocol
        self.root = root.strip("/")
        self.fs = fs if fs is not None else open_filesystem(protocol, storage_options)
        self._generations: dict[str, str] = {}  # entry key -> the generation its marker named when last read
        self._infos: dict[str, dict[str, Any]] = {}  # physical path of a generation's object -> its info
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ObjectStorage({self.protocol}://{self.root})"

    # -- addressing ------------------------------------------------------------------------

    def _physical(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def describe(self, key: str) -> str:
        return f"{self.protocol}://{self._physical(key)}"

    def local_path(self, key: str) -> str | None:
        return None

    def _call(self, action: str, key: str, fn: Callable[[], _T], *, writing: bool = False) -> _T:
        """Run one store call, retrying transient failures; translate the rest into torchkeep errors."""
        for attempt in range(_ATTEMPTS):
            try:
                return fn()
            except FileNotFoundError as exc:
                raise CheckpointNotFoundError(f"Nothing at {self.describe(key)!r}.", path=self.describe(key)) from exc
            except Exception as exc:
                if _transient(exc) and attempt < _ATTEMPTS - 1:
                    time.sleep(min(8.0, 0.05 * 2**attempt) * (0.5 + random.random()))  # backoff with jitter
                    continue
                if isinstance(exc, TorchkeepError) or _precondition_failed(exc):
                    raise
                untouched = " Earlier checkpoints are untouched." if writing else ""
                raise StorageError(
                    f"Could not {action} {self.describe(key)!r}: {type(exc).__name__}: {exc}.{untouched}",
                    path=self.describe(key),
                ) from exc
        raise AssertionError("unreachable")

    def _marker(self, key: str, *, etag: bool = False) -> dict[str, Any] | None:
        """The commit marker at ``key`` if the object there is one (None: no object, or a plain object).

        One ranged GET; with ``etag``, the marker's ETag is looked up too (for a conditional replace).
        """
        if not key:
            return None
        physical = self._physical(key)
        try:
            raw = self._call("read", key, lambda: self.fs.cat_file(physical, start=0, end=_MAX_MARKER_BYTES + 1))
        except CheckpointNotFoundError:
            return None  # nothing there, or a folder rather than an object
        if len(raw) > _MAX_MARKER_BYTES or not raw.startswith(b'{"' + _MARKER_KEY.encode()):
            return None
        try:
            marker = json.loads(raw)
        except ValueError:
            raise CorruptCheckpointError(f"The commit marker {self.describe(key)!r} is damaged.") from None
        if not isinstance(marker, dict) or not isinstance(marker.get("generation"), str):
            raise CorruptCheckpointError(f"The commit marker {self.describe(key)!r} is damaged.")
        if etag:
            info = self.info(key) or {}
            marker["etag"] = info.get("ETag") or info.get("etag")
        return marker

    def _data_prefix(self, entry: str, generation: str) -> str:
        return join_key(parent_key(entry), DATA, entry.rsplit("/", 1)[-1], generation)

    def _locate(self, key: str, *, fresh: bool = False) -> str:
        """The physical key of ``key``: itself, or inside the generation of the entry that holds it."""
        parts = key.split("/")
        for depth in range(len(parts) - 1, 0, -1):
            entry = "/".join(parts[:depth])
            with self._lock:
                generation = None if fresh else self._generations.get(entry)
            if generation is None:
                marker = self._marker(entry)
                if marker is None:
                    continue
                generation = marker["generation"]
                with self._lock:
                    self._generations[entry] = generation
            return join_key(self._data_prefix(entry, generation), *parts[depth:])
        return key

    def _read_located(self, action: str, key: str, read: Callable[[str], _T]) -> _T:
        """Read through the entry's remembered generation; look it up again if it has gone."""
        try:
            return self._call(action, key, lambda: read(self._physical(self._locate(key))))
        except CheckpointNotFoundError:
            with self._lock:
                self._infos.clear()
            return self._call(action, key, lambda: read(self._physical(self._locate(key, fresh=True))))

    # -- reading ---------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        if not key:
            return True
        located = self._locate(key)
        if located != key:  # an object of an entry's generation
            try:
                self._read_located("look at", key, self._info_of)
                return True
            except CheckpointNotFoundError:
                return False
        physical = self._physical(key)
        return bool(self._call("look at", key, lambda: self.fs.exists(physical)))

    def is_dir(self, key: str) -> bool:
        if not key:
            return True
        if self._marker(key) is not None:
            return True
        physical = self._physical(self._locate(key))
        return bool(self._call("look at", key, lambda: self.fs.isdir(physical)))

    def list(self, prefix: str = "") -> list[str]:
        marker = self._marker(prefix) if prefix else None
        if marker is not None:
            with self._lock:
                self._generations[prefix] = marker["generation"]
            folder = self._physical(self._data_prefix(prefix, marker["generation"]))
        else:
            folder = self._physical(self._locate(prefix)) if prefix else self.root
        try:
            names = self._call("list", prefix, lambda: self.fs.ls(folder, detail=False, refresh=True))
        except CheckpointNotFoundError:
            return []
        out = {name.rstrip("/").rsplit("/", 1)[-1] for name in names}
        return sorted(n for n in out if n and not n.startswith(".tk-"))

    def _info_of(self, physical: str) -> dict[str, Any]:
        """``fs.info`` of an object; remembered for objects of a generation, which never change once written."""
        with self._lock:
            known = self._infos.get(physical)
        if known is not None:
            return known
        info = dict(self.fs.info(physical))
        if f"/{DATA}/" in f"/{physical}":
            with self._lock:
                self._infos[physical] = info
        return info

    def size(self, key: str) -> int:
        return int(self._read_located("look at", key, lambda p: self._info_of(p)["size"]))

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        end = None if length is None else offset + max(length, 0)
        if end is not None and end <= offset:
            return b""
        return bytes(self._read_located("read", key, lambda p: self.fs.cat_file(p, start=offset, end=end)))

    def read_into(self, key: str, offset: int, buffer: memoryview) -> None:
        view = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
        self._download(key, offset, view)

    def map(self, key: str) -> memoryview:
        total = self.size(key)
        buffer = bytearray(total)
        self._download(key, 0, memoryview(buffer))
        return memoryview(buffer)

    def _download(self, key: str, offset: int, view: memoryview) -> None:
        """Fill ``view`` from ``offset`` with ranged reads, several at once for large ones."""
        pieces = [(start, min(len(view), start + _PIECE)) for start in range(0, len(view), _PIECE)]

        def fetch(span: tuple[int, int]) -> None:
            begin, end = span
            data = self.read(key, offset + begin, end - begin)
            if len(data) != end - begin:
                raise CorruptCheckpointError(
                    f"{self.describe(key)!r} ends before byte {offset + end}; it was truncated.",
                    path=self.describe(key),
                )
            view[begin:end] = data
            _moved("down", end - begin)

        if len(pieces) <= 1:
            for span in pieces:
                fetch(span)
            return
        with concurrent.futures.ThreadPoolExecutor(min(_PARALLEL, len(pieces)), "torchkeep-get") as pool:
            for future in [pool.submit(fetch, span) for span in pieces]:
                future.result()

    # -- writing ---------------------------------------------------------------------------

    def begin(self, key: str, *, directory: bool) -> _ObjectTransaction:
        split_key(key)
        self._sweep(parent_key(key))
        return _ObjectTransaction(self, key, directory=directory)

    def join(self, key: str, token: str) -> _JoinedObjects:
        """Add objects to the directory write of ``key`` begun elsewhere and shared as ``token``."""
        split_key(key)
        return _JoinedObjects(self, key, token)

    def delete(self, key: str) -> None:
        marker = self._marker(key)
        if marker is not None:
            # The marker first: from then on the entry is not listed, and its data goes after.
            self._call("delete", key, lambda: self.fs.rm_file(self._physical(key)), writing=True)
            with self._lock:
                self._generations.pop(key, None)
            self._remove_tree(self._data_prefix(key, marker["generation"]))
            return
        physical = self._physical(key)
        if self._call("look at", key, lambda: self.fs.isfile(physical)):
            self._call("delete", key, lambda: self.fs.rm_file(physical), writing=True)
        elif self._call("look at", key, lambda: self.fs.isdir(physical)):
            self._remove_tree(key)

    def _remove_tree(self, key: str) -> None:
        physical = self._physical(key)
        with contextlib.suppress(CheckpointNotFoundError):
            self._call("delete", key, lambda: self.fs.rm(physical, recursive=True), writing=True)

    def _sweep(self, folder: str) -> None:
        """Once per folder and process: remove generations no marker names that are older than the grace period.

        One listing of the folder's ``.tk-data`` finds every generation by name (its name holds when it was
        begun); only the old ones cost a look at their entry's marker.
        """
        with _swept_lock:
            if (self.protocol, self._physical(folder)) in _swept:
                return
            _swept.add((self.protocol, self._physical(folder)))
        data = join_key(folder, DATA)
        base = self._physical(data) + "/"
        try:
            paths = self._call("list", data, lambda: self.fs.find(self._physical(data)))
        except CheckpointNotFoundError:
            return
        now = time.time()
        found = {tuple(path[len(base) :].split("/", 2)[:2]) for path in paths if path.startswith(base)}
        for name, generation in sorted(g for g in found if len(g) == 2):
            if now - _generation_time(generation) < STALE_AFTER_S:
                continue
            marker = self._marker(join_key(folder, name))
            if marker is None or marker["generation"] != generation:
                self._remove_tree(join_key(data, name, generation))

    def put_if(self, key: str, data: bytes, *, absent: bool = False, etag: str | None = None) -> str | None:
        """Write a small object only if it is absent, or only if it still has ``etag``; return its new ETag.

        The ETag comes from the write's own response where the client passes it on, so it is the ETag of
        this write, not of whatever another writer put there a moment later.

        Raises:
            CheckpointExistsError: the condition did not hold (another writer got there first).
        """
        options: dict[str, Any] = {"mode": "create"} if absent else {"IfMatch": etag} if etag else {}
        physical = self._physical(key)
        try:
            result = self._call("write", key, lambda: self.fs.pipe_file(physical, data, **options), writing=True)
            return result.get("ETag") if isinstance(result, dict) else None
        except Exception as exc:
            if _precondition_failed(exc):
                raise CheckpointExistsError(
                    f"{self.describe(key)!r} was written by another writer at the same time; this write was "
                    "not published. Save again (to another step) or take the directory's lock.",
                    path=self.describe(key),
                ) from exc
            raise

    def info(self, key: str) -> dict[str, Any] | None:
        """The store's description of the object at ``key`` (size, ETag...), None if there is none."""
        try:
            return dict(self._call("look at", key, lambda: self.fs.info(self._physical(key))))
        except CheckpointNotFoundError:
            return None


def _generation_time(generation: str) -> float:
    """When a generation was begun, from its name (``<ns since the epoch>-<random>``)."""
    try:
        return int(generation.split("-", 1)[0]) / 1e9
    except ValueError:
        return 0.0


class _Bounded:
    """Calls run on a few threads, at most ``limit`` at once: :meth:`submit` waits for the oldest beyond that.

    Memory held by the calls in flight (the bytes they send) stays bounded the same way.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.futures: list[concurrent.futures.Future[Any]] = []

    def submit(self, call: Callable[[], Any]) -> None:
        in_flight = [f for f in self.futures if not f.done()]
        if len(in_flight) >= self._limit:
            in_flight[0].result()
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self._limit, "torchkeep-put")
        self.futures.append(self._pool.submit(call))

    def results(self) -> list[Any]:
        """Every call's result, in order, once all are answered; the first failure is raised then."""
        concurrent.futures.wait(self.futures)
        self.close()
        return [f.result() for f in self.futures]

    def cancel(self) -> None:
        """Drop the calls not started yet and wait for the running ones."""
        for future in self.futures:
            future.cancel()
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class _Multipart:
    """An S3 multipart upload with its parts sent on a few threads at once, each retried on its own.

    Memory stays within :data:`_PARALLEL_PARTS` parts in flight plus the one being filled.
    """

    def __init__(self, storage: ObjectStorage, key: str, physical: str) -> None:
        self._storage = storage
        self._key = key
        self._bucket, self._object, _ = storage.fs.split_path(physical)
        created = self._s3("create_multipart_upload", Bucket=self._bucket, Key=self._object)
        self._upload_id = created["UploadId"]
        self._parts = _Bounded(_PARALLEL_PARTS)

    def _s3(self, method: str, **kwargs: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._storage._call(
            "write", self._key, lambda: self._storage.fs.call_s3(method, **kwargs), writing=True
        )
        return result

    def send(self, data: bytes) -> None:
        """Upload ``data`` as the next part, waiting first if too many parts are in flight."""
        number = len(self._parts.futures) + 1

        def upload() -> dict[str, Any]:
            out = self._s3("upload_part", Bucket=self._bucket, Key=self._object, UploadId=self._upload_id,
                           PartNumber=number, Body=data)  # fmt: skip
            _moved("up", len(data))
            return {"PartNumber": number, "ETag": out["ETag"]}

        self._parts.submit(upload)

    def finish(self) -> None:
        """Wait for every part, then complete the upload: the object appears whole."""
        parts = self._parts.results()
        self._s3("complete_multipart_upload", Bucket=self._bucket, Key=self._object, UploadId=self._upload_id,
                 MultipartUpload={"Parts": parts})  # fmt: skip

    def abort(self) -> None:
        self._parts.cancel()
        with contextlib.suppress(Exception):  # best effort: the store's lifecycle rules remove the rest
            self._storage.fs.call_s3(
                "abort_multipart_upload", Bucket=self._bucket, Key=self._object, UploadId=self._upload_id
            )


class _Upload(io.RawIOBase):
    """A writable file whose bytes go to one object; the object is published whole when it is closed.

    Up to :data:`_SINGLE_PUT` bytes are kept and sent in one PUT, which can be
    retried as a whole. A larger object goes up in parts: on S3 as a multipart
    upload of :data:`_PART` byte parts, :data:`_PARALLEL_PARTS` at a time, each
    retried on its own; on other stores through the filesystem's own upload,
    whose state is the client's and which is not retried from here. Either way
    the object's size is checked once it is closed.
    """

    def __init__(
        self, storage: ObjectStorage, key: str, send: Callable[[Callable[[], None]], None] | None = None
    ) -> None:
        super().__init__()
        self._send = send
        self._storage = storage
        self._key = key
        self._physical = storage._physical(key)
        self._buffer = bytearray()
        self._file: Any = None
        self._multipart: _Multipart | None = None
        self._written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._written += len(view)
        if self._file is None and self._multipart is None and len(self._buffer) + len(view) <= _SINGLE_PUT:
            self._buffer += view
            return len(view)
        try:
            if self._file is None and self._multipart is None:
                if hasattr(self._storage.fs, "call_s3") and hasattr(self._storage.fs, "split_path"):
                    self._multipart = _Multipart(self._storage, self._key, self._physical)
                else:
                    self._file = self._storage.fs.open(self._physical, "wb", block_size=_PIECE)
            if self._multipart is not None:
                self._buffer += view
                while len(self._buffer) >= _PART:
                    self._multipart.send(bytes(self._buffer[:_PART]))
                    del self._buffer[:_PART]
                return len(view)
            if self._buffer:
                self._file.write(self._buffer)
                _moved("up", len(self._buffer))
                self._buffer = bytearray()
            self._file.write(view)
        except TorchkeepError:
            raise
        except Exception as exc:
            raise self._failed(exc) from exc
        _moved("up", len(view))
        return len(view)

    def _failed(self, exc: BaseException) -> StorageError:
        where = self._storage.describe(self._key)
        return StorageError(
            f"Could not upload {where!r}: {type(exc).__name__}: {exc}. Nothing was published.", path=where
        )

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._multipart is not None:
                if self._buffer:
                    self._multipart.send(bytes(self._buffer))
                self._multipart.finish()
            elif self._file is None:
                put = functools.partial(self._put, bytes(self._buffer))
                if self._send is not None:
                    self._send(put)  # answered (and checked) before the commit
                    return
                put()
                return
            else:
                try:
                    self._file.close()
                except Exception as exc:
                    raise self._failed(exc) from exc
            self._check_size()
        except BaseException:
            if self._multipart is not None:
                self._multipart.abort()
            raise
        finally:
            self._buffer = bytearray()
            super().close()

    def _put(self, data: bytes) -> None:
        self._storage._call("write", self._key, lambda: self._storage.fs.pipe_file(self._physical, data), writing=True)
        _moved("up", len(data))
        self._check_size()

    def _check_size(self) -> None:
        info = self._storage._call("look at", self._key, lambda: self._storage.fs.info(self._physical))
        if int(info.get("size", -1)) != self._written:
            raise StorageError(
                f"{self._storage.describe(self._key)!r} holds {info.get('size')} bytes after its upload, not the "
                f"{self._written} written; nothing was published.",
                path=self._storage.describe(self._key),
            )

    def discard(self) -> None:
        """Give up the upload: nothing is published."""
        if not self.closed:
            if self._multipart is not None:
                self._multipart.abort()
            discard = getattr(self._file, "discard", None)
            if discard is not None:
                with contextlib.suppress(Exception):  # best effort, on a path that is failing already
                    discard()
            self._buffer = bytearray()
            io.RawIOBase.close(self)


class _ObjectTransaction(TransactionBase):
    """A staged write: a directory entry's objects into a fresh generation, then its marker."""

    def __init__(self, storage: ObjectStorage, key: str, *, directory: bool) -> None:
        self.key = key
        self._storage = storage
        self._directory = directory
        self._generation = f"{time.time_ns()}-{secrets.token_hex(4)}"
        self._names: set[str] = set()
        self._open: list[_Upload] = []
        self._puts = _Bounded(_PARALLEL_PUTS)  # the objects sent in one PUT each, answered before the commit
        self._done = False
        self._wrote_single = False
        # The entry as this write found it: the commit succeeds only if it is still so (optimistic concurrency).
        self._previous = storage._marker(key, etag=True) if directory else None

    def open(self, name: str = "") -> BinaryIO:
        check_open(self.key, name, done=self._done, directory=self._directory)
        if name in self._names:
            raise StorageError(f"{name!r} was already written in this save of {self.key!r}.", path=self.key)
        self._names.add(name)
        if self._directory:
            split_key(name)
            target = join_key(self._storage._data_prefix(self.key, self._generation), name)
        else:
            target = self.key
            self._wrote_single = True
        upload = _Upload(self._storage, target, self._puts.submit)
        self._open.append(upload)
        return upload  # type: ignore[return-value]

    def share(self) -> str:
        """A token with which other processes add objects to this directory write (:meth:`ObjectStorage.join`)."""
        if not self._directory or self._done:
            raise InvalidArgumentError(f"Only an unfinished directory write of {self.key!r} can be shared.")
        return self._generation

    def commit(self) -> None:
        if self._done:
            raise InvalidArgumentError(f"The write of {self.key!r} has already finished.")
        try:
            for upload in self._open:
                if not upload.closed:
                    upload.close()
            self._puts.results()
        except BaseException:
            self.abort()
            raise
        if not self._directory:
            if not self._wrote_single:
                raise InvalidArgumentError(f"Nothing was written for {self.key!r}: open its object before committing.")
            self._done = True
            return
        storage = self._storage
        previous = self._previous
        if previous is None and storage.info(self.key) is not None and storage._marker(self.key) is None:
            self.abort()
            raise CheckpointExistsError(
                f"{storage.describe(self.key)!r} is an object, not a checkpoint directory; it is left untouched.",
                path=storage.describe(self.key),
            )
        marker = json.dumps(
            {_MARKER_KEY: 1, "generation": self._generation, "created": utc_now(),
             "writer": {"host": socket.gethostname(), "pid": os.getpid()}},
        ).encode()  # fmt: skip
        try:
            if previous is None:
                storage.put_if(self.key, marker, absent=True)
            else:
                storage.put_if(self.key, marker, etag=previous.get("etag"))
        except BaseException:
            self.abort()
            raise
        self._done = True
        with storage._lock:
            storage._generations[self.key] = self._generation
        if previous is not None and previous["generation"] != self._generation:
            storage._remove_tree(storage._data_prefix(self.key, previous["generation"]))

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        for upload in self._open:
            upload.discard()
        self._puts.cancel()  # the running ones are waited for: nothing lands after the removal below
        if self._directory:
            storage = self._storage
            with contextlib.suppress(TorchkeepError):  # else left for the sweep of a later writer
                storage._remove_tree(storage._data_prefix(self.key, self._generation))


class _JoinedObjects:
    """Another process's share of a directory write: objects uploaded into its generation.

    It publishes nothing; the process that began the write writes the marker, or
    removes the generation. :meth:`close` waits for every upload and raises the first failure.
    """

    def __init__(self, storage: ObjectStorage, key: str, generation: str) -> None:
        self.key = key
        self._storage = storage
        self._prefix = storage._data_prefix(key, generation)
        self._names: set[str] = set()
        self._open: list[_Upload] = []

    def open(self, name: str) -> BinaryIO:
        if name in self._names:
            raise StorageError(f"{name!r} was already written in this save of {self.key!r}.", path=self.key)
        split_key(name)
        self._names.add(name)
        upload = _Upload(self._storage, join_key(self._prefix, name))
        self._open.append(upload)
        return upload  # type: ignore[return-value]

    def close(self) -> None:
        for upload in self._open:
            if not upload.closed:
                upload.close()


def _abandoned(lease: dict[str, Any]) -> bool:
    """A lease past its expiry, or held by a process of this host that has ended."""
    if not isinstance(lease.get("expires"), (int, float)) or lease["expires"] < time.time():
        return True
    pid = lease.get("pid")
    if lease.get("host") != socket.gethostname() or type(pid) is not int or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class Lease:
    """An exclusive, expiring lock object ``.tk-lease-NAME`` in a folder of an object store.

    Taken with a create-if-absent write; renewed by a background thread every
    third of ``ttl`` with a write conditional on its own ETag; given back by
    deleting it. A holder that dies stops renewing, and its lease may be taken
    over once expired (an object store has no process to notice the death), or
    at once by a process of the same host when the holder's process is gone.

    Raises (on construction):
        DirectoryLockedError: another live holder has it (and ``blocking`` is False).
    """

    def __init__(
        self, storage: ObjectStorage, folder: str, name: str, *, blocking: bool, holder: str, ttl: float = 60.0
    ) -> None:
        from torchkeep.errors import DirectoryLockedError

        self._storage = storage
        self._key = join_key(folder, f".tk-lease-{name.lstrip('.')}")
        self._ttl = ttl
        self._token = secrets.token_hex(8)
        self._etag: str | None = None
        self._stop = threading.Event()
        while True:
            try:
                self._write(absent=True)
                break
            except CheckpointExistsError:
                current = self._read()
                if current is not None and _abandoned(current[0]):
                    try:  # expired: take it over, unless someone else just did
                        self._write(etag=current[1])
                        break
                    except CheckpointExistsError:
                        continue
                if current is None:
                    continue  # given back meanwhile
                if not blocking:
                    owner = current[0]
                    raise DirectoryLockedError(
                        f"{storage.describe(folder)!r} is held by {holder} (pid {owner.get('pid')} on host "
                        f"{owner.get('host')}, lease until {time.ctime(owner.get('expires', 0))}); two writers "
                        "would undo each other's work. Close the other one, or wait for its lease to expire if "
                        "it died. Reading needs no lock.",
                        path=storage.describe(folder),
                    ) from None
                time.sleep(min(1.0, ttl / 10) * (0.5 + random.random()))
        self._thread = threading.Thread(target=self._renew, name="torchkeep-lease", daemon=True)
        self._thread.start()

    def _body(self) -> bytes:
        return json.dumps(
            {
                "holder": self._token,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "expires": time.time() + self._ttl,
            }
        ).encode()

    def _write(self, *, absent: bool = False, etag: str | None = None) -> None:
        written = self._storage.put_if(self._key, self._body(), absent=absent, etag=etag)
        if written is None:  # a client that does not pass the response on: ask, and check it is still ours
            current = self._read()
            if current is None or current[0].get("holder") != self._token:
                raise CheckpointExistsError(f"The lease {self._storage.describe(self._key)!r} was taken over.")
            written = current[1]
        self._etag = written

    def _read(self) -> tuple[dict[str, Any], str | None] | None:
        info = self._storage.info(self._key)
        if info is None:
            return None
        try:
            raw = self._storage._call(
                "read", self._key, lambda: self._storage.fs.cat_file(self._storage._physical(self._key))
            )
            return json.loads(raw), info.get("ETag") or info.get("etag")
        except (CheckpointNotFoundError, ValueError):
            return None

    def _renew(self) -> None:
        while not self._stop.wait(self._ttl / 3):
            try:
                self._write(etag=self._etag)
            except TorchkeepError:
                return  # lost (taken over after expiring, or the store unreachable): the next writer may proceed

    def release(self) -> None:
        """Give the lease back; safe to call twice."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        current = self._read()
        if current is not None and current[0].get("holder") == self._token:
            with contextlib.suppress(TorchkeepError):  # else it expires on its own
                self._storage._call(
                    "delete", self._key, lambda: self._storage.fs.rm_file(self._storage._physical(self._key))
                )
