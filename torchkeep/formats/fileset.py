"""Sealed folders: a checksum manifest over a folder of files that another engine wrote.

A Hugging Face Trainer ``checkpoint-N/`` or a ``torch.distributed.checkpoint``
folder is written by its own engine, file by file, with no fsync and nothing
that says "complete". :func:`seal_folder` makes it one: once the engine has
finished, it fsyncs every file and folder, then writes ``torchkeep-files.json``
atomically (temporary name, fsync, rename, fsync of the folder) as the last
file. The folder counts as complete exactly when that file is there and its
digest holds; :func:`verify_folder` (and ``torchkeep.verify``) re-reads every
byte against it. Layout (format version 1), compact JSON with sorted keys,
sealed like ``manifest.json`` (see :func:`torchkeep.manifest.seal`)::

    {"checksum_algorithm": "xxh3-64", "created": "2026-11-28T15:00:00.123456Z",
     "engine": "transformers.Trainer",
     "files": [{"checksum": "9f...", "path": "config.json", "size": 731}, ...],
     "format": "torchkeep.fileset", "format_version": 1,
     "metadata": {... the caller's JSON ...}, "provenance": {...},
     "manifest_digest": "<xxh3-64 of everything before it, closed with '}'>"}

``files`` lists every other file of the folder, sub-folders included, by its
relative POSIX path, sorted. A file found later that the manifest does not
list is reported by :func:`verify_folder` (``unlisted``) but is not damage:
every byte the engine wrote is still there and intact.

Reading the files is the engine's business: ``torchkeep.load`` refuses a
sealed folder (:class:`~torchkeep.errors.UnsupportedFormatError`, naming the
files it can load one by one), except one that holds a sharded safetensors
model (one ``*.safetensors.index.json``), which loads as that model, as it did
before it was sealed.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from torchkeep.errors import (
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    InvalidArgumentError,
    UnsupportedFormatError,
)
from torchkeep.formats.detect import FILESET_NAME, TORCH_SUFFIXES, Format, is_safetensors_head
from torchkeep.formats.native import read_manifest_bytes
from torchkeep.formats.safetensors_file import open_sharded_safetensors
from torchkeep.formats.source import ManifestSource, Place
from torchkeep.formats.streaming import CopyJob
from torchkeep.info import CheckpointInfo, VerifyReport, human_size
from torchkeep.integrity import CHECKSUM_ALGORITHM, new_checksum
from torchkeep.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    Manifest,
    bound_containers,
    check_metadata,
    encode_sorted,
    provenance,
    same_form,
    seal,
    sealed_body,
    strict_json,
    utc_now,
)
from torchkeep.progress import Progress, Tally
from torchkeep.storage import Storage, join_key, resolve, split_key
from torchkeep.storage.local import storage_error
from torchkeep.tree import encode_tree

__all__ = [
    "FILESET_FORMAT",
    "FILESET_NAME",
    "FILESET_VERSION",
    "FileEntry",
    "FileInfo",
    "FolderInfo",
    "FolderManifest",
    "FolderSource",
    "FolderVerifyReport",
    "open_fileset",
    "read_folder_manifest",
    "seal_folder",
    "verify_folder",
]

FILESET_FORMAT = "torchkeep.fileset"
#: The newest file-manifest format this torchkeep reads and writes.
FILESET_VERSION = 1
_CHUNK = 8 * 1024 * 1024  # bytes read and hashed at a time
_PARALLEL_BYTES = 64 * 1024 * 1024  # below this, files are hashed on one thread
#: A file on a storage without local paths is scanned for pickles only up to this size (it is read whole).
_MAX_REMOTE_SCAN = 256 * 1024 * 1024

_Count = Annotated[int, msgspec.Meta(ge=0)]


class FileEntry(msgspec.Struct, frozen=True, gc=False):
    """One file of a sealed folder: its path relative to the folder (``/``-separated), size and xxh3-64."""

    path: str
    size: _Count
    checksum: str


class FolderManifest(msgspec.Struct, frozen=True, kw_only=True):
    """The parsed ``torchkeep-files.json`` of a sealed folder."""

    engine: str
    files: tuple[FileEntry, ...]
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    created: str = msgspec.field(default_factory=utc_now)
    provenance: dict[str, str] = msgspec.field(default_factory=provenance)
    checksum_algorithm: str = CHECKSUM_ALGORITHM
    format_version: int = FILESET_VERSION
    format: str = FILESET_FORMAT

    @property
    def nbytes(self) -> int:
        """Total size of the listed files."""
        return sum(f.size for f in self.files)

    def to_bytes(self) -> bytes:
        """The manifest as written: canonical JSON closed by its own digest."""
        raw = bytes(seal(bytearray(encode_sorted(self))))
        if len(raw) > MAX_MANIFEST_BYTES:
            raise InvalidArgumentError(
                f"The file manifest would be {len(raw)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit every "
                "reader applies; nothing was sealed. Keep the metadata to a few small values."
            )
        return raw

    @classmethod
    def from_bytes(cls, raw: bytes, *, path: str | None = None) -> FolderManifest:
        """Check and parse a manifest as read from disk.

        Raises:
            UnsupportedFormatError: not a torchkeep file manifest, or a newer format version.
            ChecksumMismatchError: the bytes fail the manifest's own digest.
            CorruptCheckpointError: not in the form torchkeep writes, or an entry is invalid.
        """
        bound_containers(raw, f"The file manifest of {path!r}", path)
        sealed = sealed_body(raw)
        if sealed is None:
            _check_header(_json_or_none(raw), path)  # someone else's JSON is told apart from damage
            raise CorruptCheckpointError(
                f"The file manifest of {path!r} has no digest at its end; it was truncated or edited.", path=path
            )
        end, intact = sealed
        if not intact:
            raise ChecksumMismatchError(
                f"The file manifest of {path!r} is damaged: its contents fail their checksum. Seal the folder "
                "again only if you know its files are good; otherwise use an earlier checkpoint.",
                path=path,
                damaged=[FILESET_NAME],
            )
        try:
            manifest = _DECODER.decode(raw)  # the digest member is no field of the struct, so it is passed over
        except msgspec.ValidationError as exc:
            _check_header(_json_or_none(raw), path)  # a newer format fails here, more helpfully
            raise CorruptCheckpointError(f"The file manifest of {path!r} is damaged: {exc}.", path=path) from exc
        except (msgspec.DecodeError, RecursionError) as exc:
            raise CorruptCheckpointError(
                f"The file manifest of {path!r} is not valid JSON ({exc}).", path=path
            ) from exc
        if not same_form(raw, end, manifest):
            raise CorruptCheckpointError(
                f"The file manifest of {path!r} is damaged: it is not in the form torchkeep writes "
                "(a repeated key, an unknown field, or spacing).",
                path=path,
            )
        _check_entries(manifest, path)
        return manifest


_DECODER = msgspec.json.Decoder(type=FolderManifest)


def _json_or_none(raw: bytes) -> Any:
    try:
        return strict_json(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


def _check_header(data: object, path: str | None) -> None:
    """Refuse what is not a torchkeep file manifest, or one of a format this torchkeep does not read."""
    if not isinstance(data, dict) or data.get("format") != FILESET_FORMAT:
        if data is None:
            return  # not JSON at all: damage, which the caller reports
        raise UnsupportedFormatError(
            f"{path!r} holds a {FILESET_NAME} that is not a torchkeep file manifest.", path=path
        )
    version = data.get("format_version")
    if type(version) is not int or version < 1:
        raise CorruptCheckpointError(
            f"The file manifest of {path!r} has an invalid format_version {version!r}.", path=path
        )
    if version > FILESET_VERSION:
        raise UnsupportedFormatError(
            f"{path!r} was sealed in file-manifest format {version}; this torchkeep reads formats up to "
            f"{FILESET_VERSION}. Upgrade torchkeep to verify it.",
            path=path,
        )
    if data.get("checksum_algorithm") != CHECKSUM_ALGORITHM:
        raise UnsupportedFormatError(
            f"{path!r} uses checksum algorithm {data.get('checksum_algorithm')!r}; this torchkeep knows "
            f"{CHECKSUM_ALGORITHM!r}.",
            path=path,
        )


def _check_entries(manifest: FolderManifest, path: str | None) -> None:
    """What the schema cannot say: a known format, and unique paths that stay inside the folder."""
    _check_header(
        {"format": manifest.format, "format_version": manifest.format_version,
         "checksum_algorithm": manifest.checksum_algorithm},
        path,
    )  # fmt: skip
    seen: set[str] = set()
    for entry in manifest.files:
        why = None
        try:
            split_key(entry.path)
        except InvalidArgumentError:
            why = "is not a relative path inside the folder"
        if entry.path in seen:
            why = "appears twice"
        elif entry.path == FILESET_NAME:
            why = "is the manifest itself"
        if why is not None:
            raise CorruptCheckpointError(
                f"The file manifest of {path!r} is damaged: the file {entry.path!r} {why}.", path=path, key=entry.path
            )
        seen.add(entry.path)


# -- the files of a folder ------------------------------------------------------------------------


def _is_link(storage: Storage, key: str) -> bool:
    local = storage.local_path(key)
    return local is not None and os.path.islink(local)


def _walk(storage: Storage, key: str) -> tuple[list[str], list[str]]:
    """Every file under the folder ``key`` by relative path, and the links found (never followed).

    The seal itself and what torchkeep's own writers leave while they write
    (hidden staging, which storages never list) are not files of the folder.
    """
    files: list[str] = []
    links: list[str] = []
    pending = [""]
    while pending:
        relative = pending.pop()
        for name in storage.list(join_key(key, relative)):
            child = f"{relative}/{name}" if relative else name
            if child == FILESET_NAME:
                continue
            child_key = join_key(key, child)
            if _is_link(storage, child_key):
                links.append(child)
            elif storage.is_dir(child_key):
                pending.append(child)
            else:
                files.append(child)
    return sorted(files), sorted(links)


def _hash(storage: Storage, key: str, size: int, tally: Tally | None) -> str:
    """xxh3-64 of the first ``size`` bytes of ``key``, read in chunks into one buffer.

    Raises:
        CorruptCheckpointError: the file ends before ``size`` bytes (truncated meanwhile).
    """
    digest = new_checksum()
    buffer = memoryview(bytearray(min(_CHUNK, size)))
    offset = 0
    while offset < size:
        n = min(len(buffer), size - offset)
        storage.read_into(key, offset, buffer[:n])
        digest.update(buffer[:n])
        offset += n
        if tally is not None:
            tally.add(n)
    return str(digest.hexdigest())


def _hash_all(storage: Storage, items: list[tuple[str, int]], tally: Tally | None) -> list[str | Exception]:
    """The checksum of each ``(key, size)``, or the error reading it raised; on threads when there is much to read."""

    def one(item: tuple[str, int]) -> str | Exception:
        try:
            return _hash(storage, *item, tally)
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            return exc

    workers = min(4, os.cpu_count() or 1)
    if sum(size for _, size in items) < _PARALLEL_BYTES or workers == 1 or len(items) < 2:
        return [one(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="torchkeep-fileset") as pool:
        return list(pool.map(one, items))  # xxhash and pread release the GIL


def _sync(storage: Storage, key: str, files: Iterable[str]) -> None:
    """Make the engine's files durable before the seal says they are there: fsync each file, then each folder.

    Engines such as the Trainer write with plain ``open``/``torch.save`` and no
    fsync. Only a local disk needs this; an object store has a file once its
    upload returns.
    """
    root = storage.local_path(key)
    if root is None:
        return
    folders = {root}
    for relative in files:
        path = os.path.join(root, *relative.split("/"))
        folders.add(os.path.dirname(path))
        _fsync(path, os.O_RDONLY)
    for folder in sorted(folders, key=len, reverse=True):  # the deepest first, the folder itself last
        _fsync(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: str, flags: int) -> None:
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise storage_error("flush", path, exc) from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # a filesystem that cannot sync (some FUSE mounts) has nothing to sync
            raise storage_error("flush", path, exc) from exc
    finally:
        os.close(fd)


# -- sealing and reading --------------------------------------------------------------------------


def seal_folder(
    path: str | os.PathLike[str],
    *,
    engine: str,
    metadata: dict[str, Any] | None = None,
    storage: Storage | None = None,
) -> FolderManifest:
    """Mark a folder another engine has finished writing as complete: fsync it, then write its checksums last.

    Call it after the engine has written the last file (a Trainer's
    ``on_save``, the return of ``dcp.save``). Every file under the folder is
    fsync'd and hashed (xxh3-64, read in chunks), then ``torchkeep-files.json``
    is written atomically. Sealing again replaces the manifest with one of the
    files as they are now. The engine's files are never changed.

    Args:
        path: the folder (a path or URL).
        engine: what wrote the files, such as ``"transformers.Trainer"``; shown by ``inspect``.
        metadata: plain JSON values to keep with the seal (step, epoch...).
        storage: seal the folder at key ``path`` of this storage instead.

    Returns:
        The manifest written.

    Raises:
        CheckpointNotFoundError: nothing is at ``path``.
        InvalidArgumentError: ``path`` is a file, an empty folder, a native
            torchkeep checkpoint, or holds a symbolic link.
        StorageError: a file could not be flushed, or the manifest written.
    """
    st, key = resolve(path, storage)
    where = st.describe(key)
    if not st.exists(key):
        raise CheckpointNotFoundError(f"No folder at {where!r} to seal.", path=where)
    if not st.is_dir(key):
        raise InvalidArgumentError(f"{where!r} is a file; seal_folder seals the folder an engine wrote.", path=where)
    if st.exists(join_key(key, MANIFEST_NAME)):
        raise InvalidArgumentError(
            f"{where!r} is a native torchkeep checkpoint ({MANIFEST_NAME}); it carries its own checksums "
            "and needs no seal.",
            path=where,
        )
    if not isinstance(engine, str) or not engine:
        raise InvalidArgumentError("engine must name what wrote the files, such as 'transformers.Trainer'.")
    plain = check_metadata(metadata)
    files, links = _walk(st, key)
    if links:
        raise InvalidArgumentError(
            f"{where!r} holds symbolic links ({', '.join(map(repr, links))}); torchkeep does not follow links "
            "out of a folder it seals. Replace them with the files themselves.",
            path=where,
        )
    if not files:
        raise InvalidArgumentError(f"{where!r} holds no files; there is nothing to seal.", path=where)
    _sync(st, key, files)
    sizes = [(join_key(key, f), st.size(join_key(key, f))) for f in files]
    digests = _hash_all(st, sizes, None)
    for relative, digest in zip(files, digests, strict=True):
        if isinstance(digest, Exception):
            raise InvalidArgumentError(
                f"{relative!r} of {where!r} changed while it was sealed ({digest}); the engine is still "
                "writing. Seal the folder once it has finished.",
                path=where,
                key=relative,
            ) from digest
    entries = tuple(
        FileEntry(path=f, size=size, checksum=digest)
        for f, (_, size), digest in zip(files, sizes, digests, strict=True)
        if isinstance(digest, str)
    )
    manifest = FolderManifest(engine=engine, files=entries, metadata=plain)
    raw = manifest.to_bytes()
    with st.begin(join_key(key, FILESET_NAME), directory=False) as txn, txn.open() as f:
        f.write(raw)
    return manifest


def _read_manifest(storage: Storage, key: str) -> FolderManifest:
    path = storage.describe(key)
    manifest_key = join_key(key, FILESET_NAME)
    if not storage.exists(manifest_key):
        raise CheckpointNotFoundError(
            f"{path!r} has no {FILESET_NAME}, so it was never sealed as complete (a save interrupted before "
            "it was sealed leaves none, and so does an engine run without torchkeep's seal).",
            path=path,
        )
    return FolderManifest.from_bytes(read_manifest_bytes(storage, manifest_key, path, "file manifest"), path=path)


def read_folder_manifest(path: str | os.PathLike[str], *, storage: Storage | None = None) -> FolderManifest:
    """Read and check the seal of a folder (its own digest, not the files).

    Raises:
        CheckpointNotFoundError: the folder is not sealed.
        ChecksumMismatchError: the manifest fails its digest.
        CorruptCheckpointError: the manifest is damaged.
        UnsupportedFormatError: a newer file-manifest format.
    """
    st, key = resolve(path, storage)
    return _read_manifest(st, key)


def verify_folder(
    path: str | os.PathLike[str], *, progress: Progress | None = None, storage: Storage | None = None
) -> FolderVerifyReport:
    """Re-read every file of a sealed folder against its seal; the same as ``torchkeep.verify`` on it.

    ``progress(done_bytes, total_bytes)`` is called as the bytes are checked.

    Returns:
        The report when every listed file is there, with its size and
        checksum. Files the seal does not list (added later) are named in
        ``unlisted`` and are not damage.

    Raises:
        CheckpointNotFoundError: the folder is not sealed.
        ChecksumMismatchError: names every file that is missing, changed size or fails its checksum.
        CorruptCheckpointError, UnsupportedFormatError: the manifest is damaged, or from a newer format.
    """
    st, key = resolve(path, storage)
    return open_fileset(st, key).check(progress=progress)


def check_sizes(storage: Storage, key: str) -> None:
    """A cheaper check than :func:`verify_folder`: the seal is intact and every file is there, of its sealed size.

    Raises as :func:`verify_folder` does; a changed byte of a file of the right size goes unnoticed.
    """
    _raise_if_damaged(storage, key, _read_manifest(storage, key), None, hashed=False)


def _damage(
    storage: Storage, key: str, manifest: FolderManifest, tally: Tally | None, *, hashed: bool = True
) -> tuple[dict[str, str], int]:
    """What is wrong with each damaged listed file, by path, and how many bytes were hashed.

    Without ``hashed`` only links, presence and sizes are checked.
    """
    problems: dict[str, str] = {}
    to_hash: list[FileEntry] = []
    for entry in manifest.files:
        file_key = join_key(key, entry.path)
        if _is_link(storage, file_key):
            problems[entry.path] = "was replaced by a symbolic link"
            continue
        try:
            if not storage.exists(file_key) or storage.is_dir(file_key):
                problems[entry.path] = "is missing"
                continue
            size = storage.size(file_key)
        except CheckpointNotFoundError:
            problems[entry.path] = "is missing"
            continue
        if size != entry.size:
            problems[entry.path] = f"is {size} bytes, not {entry.size} (truncated or rewritten)"
            if tally is not None:
                tally.add(entry.size)
        elif hashed:
            to_hash.append(entry)
    digests = _hash_all(storage, [(join_key(key, e.path), e.size) for e in to_hash], tally)
    for entry, digest in zip(to_hash, digests, strict=True):
        if isinstance(digest, CheckpointNotFoundError):
            problems[entry.path] = "is missing"
        elif isinstance(digest, Exception):
            problems[entry.path] = f"could not be read whole ({digest})"
        elif digest != entry.checksum:
            problems[entry.path] = "fails its checksum"
    return dict(sorted(problems.items())), sum(e.size for e in to_hash)


def _raise_if_damaged(
    storage: Storage, key: str, manifest: FolderManifest, progress: Progress | None, *, hashed: bool = True
) -> int:
    """Check every listed file; raise naming each one that is not as sealed, else return the bytes hashed.

    Raises:
        ChecksumMismatchError: with ``damaged`` listing every file missing, of another size, or failing its checksum.
    """
    tally = Tally(manifest.nbytes, progress) if progress is not None else None
    problems, done = _damage(storage, key, manifest, tally, hashed=hashed)
    if tally is not None:
        tally.finish()
    if problems:
        path = storage.describe(key)
        listed = "; ".join(f"{name!r} {why}" for name, why in list(problems.items())[:20])
        more = f"; and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ChecksumMismatchError(
            f"{path!r} is damaged ({len(problems)} of its {len(manifest.files)} sealed files): {listed}{more}. "
            "Use an earlier checkpoint, or restore these files from a good copy.",
            path=path,
            damaged=list(problems),
        )
    return done


# -- reports --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileInfo:
    """One file of a sealed folder, as ``inspect`` describes it.

    Attributes:
        path: relative to the folder, ``/``-separated.
        size: in bytes, as sealed.
        checksum: its xxh3-64, as sealed.
        pickle: what torchkeep's pickle scan says: ``"none"`` (the file holds
            no pickle: JSON, safetensors, raw data), ``"safe"`` (torch's
            ``weights_only`` unpickler accepts it), ``"needs trust"`` (it
            imports something off that unpickler's allow-list: only its
            engine, or ``trust=True``, can read it), ``"unreadable"`` (the
            scan could not read it as torch would) or ``"not scanned"`` (a
            large file on an object store, which the scan would download).
        findings: what the scan found, in words.
    """

    path: str
    size: int
    checksum: str
    pickle: str
    findings: tuple[str, ...] = ()

    @property
    def needs_trust(self) -> bool:
        """Whether unpickling the file needs ``trust``: it imports globals off the safe list."""
        return self.pickle == "needs trust"


@dataclass(frozen=True)
class FolderInfo(CheckpointInfo):
    """What ``torchkeep.inspect`` reports about a sealed folder: the seal, and each file.

    ``tensors`` and ``tree`` describe the model a folder holding a sharded
    safetensors index loads as, and are empty otherwise; ``nbytes`` is the
    size of all the files.

    Attributes:
        engine: what wrote the files.
        files: each file of the seal, with what the pickle scan found in it.
    """

    engine: str = ""
    files: tuple[FileInfo, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def needs_trust(self) -> list[str]:
        """The files whose pickles import globals off the safe list (only their engine should unpickle them)."""
        return [f.path for f in self.files if f.needs_trust]

    def __str__(self) -> str:
        lines = [
            f"{self.path}  ({self.format} v{self.format_version}, {len(self.files)} files, {human_size(self.nbytes)}, "
            f"written by {self.engine})"
        ]
        if self.created:
            lines.append(f"sealed {self.created}")
        if self.metadata:
            lines.append(f"metadata {self.metadata}")
        if self.tensors:
            lines.append(f"loads as a model of {len(self.tensors)} tensors")
        width = max([len(f.path) for f in self.files] + [4])
        lines.append(f"{'file':<{width}}  {'size':>10}  pickle")
        for f in self.files:
            lines.append(f"{f.path:<{width}}  {human_size(f.size):>10}  {f.pickle}")
        for f in self.files:
            for finding in f.findings:
                lines.append(f"{f.path}: {finding}")
        return "\n".join(lines)


@dataclass(frozen=True)
class FolderVerifyReport(VerifyReport):
    """The result of verifying a sealed folder that passed.

    ``tensors`` counts the tensors of the model the folder loads as (a sharded
    safetensors index), 0 for others; ``nbytes`` the bytes of files checked.

    Attributes:
        files: how many files were checked against the seal.
        unlisted: files found that the seal does not list (added after it); not damage.
    """

    files: int = 0
    unlisted: tuple[str, ...] = ()

    def __str__(self) -> str:
        line = f"OK {self.path}: {self.files} files, {human_size(self.nbytes)} checked ({self.method})"
        if self.unlisted:
            line += f"; not in the seal (added later, not checked): {', '.join(self.unlisted)}"
        return line


# -- the opener -----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FolderSource(ManifestSource):
    """A sealed folder opened by ``torchkeep.inspect``, ``verify`` and ``load``.

    It is a :class:`ManifestSource` so that every reader accepts it: when the
    folder holds one ``*.safetensors.index.json`` its manifest is that sharded
    model's, and loading reads the model as for an unsealed folder; otherwise
    the manifest holds no tensors and every read raises
    :class:`~torchkeep.errors.UnsupportedFormatError` saying what to do.
    ``info`` and ``check`` describe and verify the files themselves.
    """

    folder: FolderManifest = dataclasses.field(kw_only=True)
    key: str = dataclasses.field(kw_only=True)  # the folder's storage key
    index: str | None = dataclasses.field(default=None, kw_only=True)  # the sharded model's index file, if one

    def _refuse(self) -> UnsupportedFormatError:
        loadable = [
            f.path for f in self.folder.files
            if f.path.endswith((".safetensors", ".safetensors.index.json", *(f".{s}" for s in TORCH_SUFFIXES)))
        ]  # fmt: skip
        hint = (
            f" torchkeep loads some of its files one by one: {', '.join(repr(p) for p in loadable[:8])} "
            f"(torchkeep.load('{self.path}/{loadable[0]}'))."
            if loadable
            else ""
        )
        return UnsupportedFormatError(
            f"{self.path!r} is a folder of files written by {self.folder.engine} and sealed by torchkeep "
            f"({FILESET_NAME}); it is not one state tree torchkeep can load. Load it with the engine that "
            "wrote it (a Trainer checkpoint: trainer.train(resume_from_checkpoint=...)); torchkeep.verify and "
            f"torchkeep.inspect check and describe it.{hint}",
            path=self.path,
        )

    def placeholder_tree(self, node: Any = None, *, trust: bool = False, verify: bool = True) -> Any:
        if self.index is None:
            raise self._refuse()
        return super().placeholder_tree(node, trust=trust, verify=verify)

    def top_level_names(self) -> list[Any] | None:
        if self.index is None:
            raise self._refuse()
        return super().top_level_names()

    def read_arrays(
        self,
        *,
        verify: bool,
        build: bool = True,
        names: Iterable[str] | None = None,
        copy: bool = False,
        progress: Progress | None = None,
    ) -> tuple[dict[str, Any], int]:
        if self.index is None:
            raise self._refuse()
        return super().read_arrays(verify=verify, build=build, names=names, copy=copy, progress=progress)

    def read_tree(self, *, verify: bool, key: Any = None, place: Place | None = None, copy: bool = False) -> Any:
        if self.index is None:
            raise self._refuse()
        return super().read_tree(verify=verify, key=key, place=place, copy=copy)

    def stream_into(self, jobs: list[CopyJob], *, verify: bool) -> set[str]:
        if self.index is None:
            raise self._refuse()
        return super().stream_into(jobs, verify=verify)

    def info(self, *, trust: bool = False) -> FolderInfo:
        """The seal and each file, with what the pickle scan finds in it (tensor data is not read)."""
        base = super().info() if self.index is not None else None
        return FolderInfo(
            path=self.path,
            format=self.format,
            format_version=self.folder.format_version,
            tree=base.tree if base is not None else None,
            tensors=base.tensors if base is not None else (),
            metadata=self.folder.metadata,
            provenance=self.folder.provenance,
            created=self.folder.created,
            engine=self.folder.engine,
            files=tuple(_file_info(self.storage, self.key, entry) for entry in self.folder.files),
        )

    def check(self, *, trust: bool = False, progress: Progress | None = None) -> FolderVerifyReport:
        """Re-read every listed file against its size and checksum; raise naming every damaged one."""
        hashed = _raise_if_damaged(self.storage, self.key, self.folder, progress)
        if self.index is not None:
            _ = self.stored  # the model's headers and offsets, as loading reads them
        listed = {f.path for f in self.folder.files}
        unlisted = tuple(p for p in _walk(self.storage, self.key)[0] if p not in listed)
        return FolderVerifyReport(
            self.path, self.format, len(self.manifest.tensors), hashed, CHECKSUM_ALGORITHM,
            files=len(self.folder.files), unlisted=unlisted,
        )  # fmt: skip


def _may_hold_pickle(head: bytes) -> bool:
    """Whether a file's first bytes are those of a pickle, a torch file (zip or legacy) or another zip."""
    if is_safetensors_head(head):
        return False  # its header's length may begin with the bytes a pickle begins with
    return head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5)


def _file_info(storage: Storage, key: str, entry: FileEntry) -> FileInfo:
    """Describe one sealed file, scanning it if it holds pickles (never unpickling it)."""
    from torchkeep.scan import scan_bytes, scan_file

    file_key = join_key(key, entry.path)

    def info(pickle: str, findings: Iterable[str] = ()) -> FileInfo:
        return FileInfo(entry.path, entry.size, entry.checksum, pickle, tuple(findings))

    try:
        head = storage.read(file_key, 0, 16)
    except CheckpointNotFoundError:
        return info("unreadable", ["the file is missing"])
    if not _may_hold_pickle(head):
        return info("none")
    local = storage.local_path(file_key)
    if local is not None:
        result = scan_file(local)
    elif entry.size <= _MAX_REMOTE_SCAN:
        result = scan_bytes(storage.read(file_key), storage.describe(file_key))
    else:
        return info("not scanned", [f"over {human_size(_MAX_REMOTE_SCAN)} on a remote store; not downloaded"])
    if result.findings:
        return info("needs trust", [f.describe() for f in result.findings])
    if result.errors:
        return info("unreadable", result.errors)
    return info("safe")


def open_fileset(storage: Storage, key: str) -> FolderSource:
    """Open the sealed folder at ``key``: its manifest is read and checked, its files are not.

    Raises:
        CheckpointNotFoundError: the folder is not sealed.
        CorruptCheckpointError: the manifest, or the index of the sharded model it holds, is damaged.
        UnsupportedFormatError: a newer file-manifest format.
    """
    path = storage.describe(key)
    folder = _read_manifest(storage, key)
    indexes = [f.path for f in folder.files if "/" not in f.path and f.path.endswith(".safetensors.index.json")]
    if len(indexes) == 1:
        try:
            model = open_sharded_safetensors(storage, join_key(key, indexes[0]))
        except (CorruptCheckpointError, CheckpointNotFoundError):
            _raise_if_damaged(storage, key, folder, None)  # name every damaged file, not only this one
            raise
        manifest, shard_keys = model.manifest, dict(model.shard_keys)
        index: str | None = indexes[0]
    else:
        manifest = Manifest(
            tree=encode_tree({})[0], tensors=(), shards=(), metadata=folder.metadata,
            created=folder.created, provenance=folder.provenance,
        )  # fmt: skip
        shard_keys, index = {}, None
    return FolderSource(Format.FILESET, path, storage, manifest, shard_keys, folder=folder, key=key, index=index)
