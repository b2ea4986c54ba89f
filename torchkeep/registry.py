"""Registry: named, immutable, versioned model releases with aliases and a queryable index.

Layout under the root (the files are the source of truth; the index is derived)::

    models/NAME/v1/              a native checkpoint; its manifest metadata holds the
    models/NAME/v2/              version's record (metadata, tags, description, lineage)
    models/NAME/aliases/ALIAS    {"version": 2} (written atomically; may move)
    index.sqlite                 SQLite (WAL) index for queries, rebuilt from the files when missing
    .registry.lock               serializes writers across processes (a lease object on an object store)

On an object store (``s3://bucket/reg``) the index is a local cache instead:
``registry-<hash of the URL>.sqlite`` in ``$TORCHKEEP_CACHE_DIR``, else
``$XDG_CACHE_HOME/torchkeep``, else ``~/.cache/torchkeep`` (or ``cache_dir=``).
It is checked against the store exactly as a local index is checked against
the files (below), refreshed from the store by the read that finds it behind,
and written under a lock of its own on the local disk, so a reader never takes
the store's lease. The store stays the truth: the cache only saves re-reading
what has not changed.

Registering takes the lock, picks the next version number from the files,
writes and verifies the checkpoint, then updates the index: two processes
registering at once never get the same number and never lose a registration.
On an object store the version's commit marker is also created only if absent
(a conditional put): should two writers still pick one number (a lease lost
to expiry), the second moves on to the next free number.

The index remembers, for every model, a fingerprint of its files: the ``lstat``
of its folder and of its aliases folder (a version added or removed changes
them) and of each alias file. Every read compares it with the files first, a
few ``stat`` calls whatever the number of versions, never a manifest read: where
the index is behind the files (a write that stored its files but could not
update the index, a disk that filled up, a crash in between), or is missing,
damaged or cannot be opened (a read-only filesystem), reads are answered from a
private in-memory index built from the files instead, so they always see what
the files hold. The index also keeps the ``lstat`` of each version's manifest,
and a read checks it for every version it returns, so a manifest changed in
place is noticed too. Every write brings the on-disk index back in line with
the files, reading only the versions it has not seen (the folder listing says
which), and :meth:`Registry.rebuild_index` replaces it outright.

Search conditions are answered by SQL over a table of top-level metadata
fields (indexed by field and value), which picks the candidates; the exact
JSON comparison is then made in Python on those few.

A version whose files are damaged, or an alias file that is not a small
regular file, is left out of listings with a ``RuntimeWarning`` naming it; the
other versions stay usable, and asking for the damaged one raises
:class:`~torchkeep.errors.CorruptCheckpointError`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import secrets
import sqlite3
import stat
import threading
import urllib.parse
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

from torchkeep.compare import compare_tensors, flatten_tensors
from torchkeep.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidArgumentError,
    StorageError,
    TorchkeepError,
)
from torchkeep.formats.native import read_manifest
from torchkeep.loading import load, verify
from torchkeep.locking import FolderLock
from torchkeep.manifest import MANIFEST_NAME, check_metadata, utc_now
from torchkeep.model_loading import load_into
from torchkeep.report import LoadReport
from torchkeep.retention import CheckpointRecord
from torchkeep.saving import save
from torchkeep.storage import LocalStorage, MemoryStorage, Storage, resolve

__all__ = ["ModelVersion", "Registry", "VersionDiff"]

_T = TypeVar("_T")

# Whole-string matches only (re.fullmatch): ``$`` would also match before a trailing newline.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# ASCII digits without a leading zero: "v01", "v1\n" or an Arabic-Indic digit is not a version folder.
_VERSION_DIR = re.compile(r"v([1-9][0-9]{0,17})")
_OPERATORS = ("=", "==", "!=", "<", "<=", ">", ">=")
_ORDERING = ("<", "<=", ">", ">=")
_LOCK_NAME = ".registry.lock"
_INDEX_NAME = "index.sqlite"
_MAX_ALIAS_BYTES = 4096
_CACHE_ENV = "TORCHKEEP_CACHE_DIR"
# How many taken numbers register skips before giving up (each one another writer's commit, seen).
_MAX_VERSION_TRIES = 1000
_SCHEMA_VERSION = 3
# files: each model's fingerprint; entries: each version folder's manifest stamp (damaged ones too);
# fields: each version's top-level metadata values, so search runs on an index.
_SCHEMA = f"""
CREATE TABLE versions (
    name TEXT NOT NULL, version INTEGER NOT NULL, path TEXT NOT NULL, created TEXT NOT NULL,
    description TEXT, tags TEXT NOT NULL, metadata TEXT NOT NULL, lineage TEXT NOT NULL,
    PRIMARY KEY (name, version));
CREATE TABLE aliases (
    name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (name, alias));
CREATE TABLE problems (
    name TEXT NOT NULL, item TEXT NOT NULL, path TEXT NOT NULL, reason TEXT NOT NULL, PRIMARY KEY (name, item));
CREATE TABLE files (name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL);
CREATE TABLE entries (
    name TEXT NOT NULL, version INTEGER NOT NULL, stamp TEXT NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE fields (
    name TEXT NOT NULL, version INTEGER NOT NULL, key TEXT NOT NULL, kind TEXT NOT NULL, num REAL, text TEXT,
    PRIMARY KEY (name, version, key));
CREATE INDEX fields_by_number ON fields (key, kind, num);
CREATE INDEX fields_by_text ON fields (key, kind, text);
PRAGMA user_version = {_SCHEMA_VERSION};
"""
_EMPTY = "[]"  # the fingerprint of a model with no files


def _version_number(folder: str) -> int:
    match = _VERSION_DIR.fullmatch(folder)
    return int(match.group(1)) if match else 0


def _version_names(fingerprint: str) -> list[str]:
    """The version folders a fingerprint of a store without local paths lists (its leading strings)."""
    return sorted((e for e in json.loads(fingerprint) if isinstance(e, str)), key=_version_number)


_V2_TABLES = ["aliases", "files", "problems", "versions"]  # the index of the previous torchkeep


def _schema_columns(conn: sqlite3.Connection) -> dict[str, list[tuple[str, str]]]:
    tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    return {t: [(c[1], c[2]) for c in conn.execute(f"PRAGMA table_info({json.dumps(t)})")] for t in tables}


def _expected_columns() -> dict[str, list[tuple[str, str]]]:
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(_SCHEMA)
        return _schema_columns(conn)
    finally:
        conn.close()


_EXPECTED_COLUMNS = _expected_columns()


@dataclass(frozen=True)
class ModelVersion:
    """One registered version of a model: immutable once written."""

    name: str
    version: int
    path: str
    created: str
    metadata: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    description: str | None = None
    lineage: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class VersionDiff:
    """What changed between two versions' tensors.

    Attributes:
        added: keys only in the second version.
        removed: keys only in the first.
        shape_changed: ``(key, shape in a, shape in b)``.
        max_abs_diff: for keys of equal shape, the largest absolute difference of values.
    """

    name: str
    a: int
    b: int
    added: list[str]
    removed: list[str]
    shape_changed: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    max_abs_diff: dict[str, float]

    @property
    def identical(self) -> bool:
        return not (self.added or self.removed or self.shape_changed) and all(
            d == 0 for d in self.max_abs_diff.values()
        )

    def __str__(self) -> str:
        lines = [f"{self.name}: v{self.a} -> v{self.b}"]
        lines += [f"  + {k}" for k in self.added]
        lines += [f"  - {k}" for k in self.removed]
        lines += [f"  ~ {k}: {list(sa)} -> {list(sb)}" for k, sa, sb in self.shape_changed]
        changed = {k: d for k, d in self.max_abs_diff.items() if d != 0}
        lines += [f"  Δ {k}: max |a-b| = {d:.3g}" for k, d in sorted(changed.items(), key=lambda kv: -kv[1])]
        unchanged = len(self.max_abs_diff) - len(changed)
        lines.append(f"  {unchanged} tensor(s) identical")
        return "\n".join(lines)


def _check_name(kind: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidArgumentError(
            f"{kind} {value!r} is not valid: use 1 to 128 ASCII letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (no '/', spaces, line breaks or other characters)."
        )
    return value


def _check_version(name: str, version: object) -> int:
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InvalidArgumentError(f"The version of {name!r} must be a positive int, not {version!r}.")
    return version


# -- files that must be what they claim to be -------------------------------------------------


def _kind(mode: int) -> str:
    kinds = [(stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"),
             (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device")]  # fmt: skip
    return next((text for test, text in kinds if test(mode)), "an unknown kind of file")


def _lstat(path: str) -> os.stat_result | None:
    """``os.lstat``, or None when nothing is there."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _not_a_regular_file(path: str) -> str | None:
    """Why ``path`` (present) must not be opened, or None when it is a plain regular file."""
    st = _lstat(path)
    if st is None or stat.S_ISREG(st.st_mode):
        return None
    return _kind(st.st_mode)


# -- turning failures into typed errors -------------------------------------------------------


class _Damaged(sqlite3.DatabaseError):
    """Internal: the index file is damaged or is not an index of this version (never reaches a caller raw)."""


class _Outdated(_Damaged):
    """Internal: an index written by an earlier torchkeep (no version, two tables; or schema 2): replaced
    without a warning."""


class _Changed(Exception):
    """Internal: a version a read was about to return changed on disk since it was indexed."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _sqlite_kind(exc: sqlite3.Error) -> str:
    """``damaged``, ``full``, ``readonly``, ``cantopen`` or ``other``, from SQLite's code or message."""
    code = str(getattr(exc, "sqlite_errorname", "") or "")
    text = str(exc).lower()
    if (
        isinstance(exc, _Damaged)
        or code.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
        or any(s in text for s in ("malformed", "not a database", "no such table", "no such column", "has no column"))
    ):
        return "damaged"
    if code == "SQLITE_FULL" or "disk is full" in text:
        return "full"
    if code.startswith("SQLITE_READONLY") or "readonly database" in text:
        return "readonly"
    if code.startswith("SQLITE_CANTOPEN") or "unable to open" in text:
        return "cantopen"
    return "other"


def _reason_and_hint(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, sqlite3.Error):
        kind = _sqlite_kind(exc)
        reason = f"SQLite reported {str(exc)!r}"
        if kind == "cantopen":
            return reason, (
                "SQLite could not open or create it: the folder may be read-only or not writable, or the disk "
                "out of space or inodes. Reads still work from the files."
            )
        err = {"full": errno.ENOSPC, "readonly": errno.EROFS}.get(kind)
    else:
        err = getattr(exc, "errno", None)
        reason = os.strerror(err) if isinstance(err, int) else str(exc)
        if err == errno.ENOSPC:
            reason = "no space or no free inode is left on the device"
    if err == errno.ENOSPC:
        return reason, "Free space (or inodes) on that filesystem, then retry."
    if err == errno.EROFS:
        return reason, "The filesystem is read-only: reads still work; write to a writable copy of the registry."
    if err in (errno.EACCES, errno.EPERM):
        return reason, "The registry is not writable here (permissions, or a read-only filesystem): reads still work."
    return reason, "Check the filesystem, then retry."


def _storage_error(action: str, path: str, exc: BaseException, *, key: str | None = None) -> StorageError:
    reason, hint = _reason_and_hint(exc)
    return StorageError(f"Could not {action} {path!r}: {reason}. {hint}", path=path, key=key)


@contextlib.contextmanager
def _typed(action: str, path: str) -> Iterator[None]:
    """Let torchkeep's own errors through; turn raw OSError and sqlite3 errors into StorageError."""
    try:
        yield
    except TorchkeepError:
        raise
    except (OSError, sqlite3.Error) as exc:
        raise _storage_error(action, path, exc) from exc


def _open_index(path: str, *, immutable: bool = False) -> sqlite3.Connection:
    """Connect to an existing index (never creating one) and check it is what torchkeep writes.

    Raises:
        _Damaged: not a database, a damaged one, or one of another schema.
        sqlite3.Error: it cannot be opened (read-only, permissions, I/O).
    """
    mode = "mode=ro&immutable=1" if immutable else "mode=rw"
    conn = sqlite3.connect(f"file:{urllib.parse.quote(path)}?{mode}", uri=True, timeout=60, check_same_thread=False)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        columns = _schema_columns(conn)
    except sqlite3.Error as exc:
        conn.close()
        if _sqlite_kind(exc) == "damaged":
            raise _Damaged(str(exc)) from exc
        raise
    if (version, sorted(columns)) in ((0, ["aliases", "versions"]), (2, _V2_TABLES)):
        conn.close()
        raise _Outdated("it was written by an earlier torchkeep")
    if version != _SCHEMA_VERSION or columns != _EXPECTED_COLUMNS:
        conn.close()
        raise _Damaged(f"its schema is not this torchkeep's (version {version}, tables {sorted(columns)})")
    return conn


# -- the version record and the alias file ----------------------------------------------------


def _record_problem(record: object, name: str, version: int) -> str | None:
    """What is wrong with a version's registry record, or None."""
    if record is None:
        return "is missing (the manifest metadata has no 'registry' entry)"
    if not isinstance(record, dict):
        return f"is a {type(record).__name__}, not an object"
    expected: list[tuple[str, type | tuple[type, ...], str]] = [
        ("name", str, "a string"), ("version", int, "an int"), ("created", str, "a string"),
        ("metadata", dict, "an object"), ("tags", list, "a list of strings"),
        ("description", (str, type(None)), "a string or null"), ("lineage", dict, "an object"),
    ]  # fmt: skip
    for key, types, what in expected:
        if key not in record:
            return f"has no {key!r}"
        value = record[key]
        if not isinstance(value, types) or isinstance(value, bool):
            return f"has {key!r} = {_short(value)}, where {what} belongs"
    if not all(isinstance(t, str) for t in record["tags"]):
        return f"has 'tags' = {_short(record['tags'])}, where a list of strings belongs"
    if record["name"] != name or record["version"] != version:
        return (
            f"names {record['name']!r} v{record['version']}, not {name!r} v{version} "
            "(the folder was copied or renamed by hand)"
        )
    return None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_alias(raw: bytes) -> int:
    """The version an alias file names; ValueError when it names none."""
    data = json.loads(raw)
    version = data.get("version") if isinstance(data, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f'it holds {_short(raw.decode("utf-8", "replace"))}, not {{"version": N}}')
    return version


# -- search: conditions checked in Python, never spliced into SQL ------------------------------


def _json_value(field_name: str, value: Any) -> Any:
    """``value`` as JSON would give it back (tuples become lists); refuse what JSON cannot hold."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidArgumentError(
            f"The search value for {field_name!r} is {_short(value)}, which metadata cannot hold ({exc}): "
            "use a string, a finite number, a bool, None, or a list or dict of those.",
            key=field_name,
        ) from None


def _parse_where(where: object) -> list[tuple[str, str, Any]]:
    if where is None:
        return []
    if not isinstance(where, Mapping):
        raise InvalidArgumentError(
            f"where must be a dict of metadata field to condition, not {type(where).__name__}: "
            "{'accuracy': ('>=', 0.9), 'dataset': 'imagenet'}."
        )
    conditions = []
    for field_name, condition in where.items():
        if not isinstance(field_name, str):
            raise InvalidArgumentError(f"The search field {field_name!r} is not a string; metadata keys are strings.")
        if isinstance(condition, tuple):
            if len(condition) != 2 or not isinstance(condition[0], str):
                raise InvalidArgumentError(
                    f"The condition for {field_name!r} is {_short(condition)}: give a value to match exactly, or "
                    f"an (operator, value) pair with operator one of {list(_OPERATORS)}; to match a list value, "
                    "pass a list, not a tuple.",
                    key=field_name,
                )
            op, value = condition
            if op not in _OPERATORS:
                raise InvalidArgumentError(
                    f"Unknown operator {op!r} for {field_name!r}; use one of {list(_OPERATORS)}.", key=field_name
                )
        else:
            op, value = "=", condition
        value = _json_value(field_name, value)
        if op in _ORDERING and not (_is_number(value) or isinstance(value, str)):
            raise InvalidArgumentError(
                f"{op!r} on {field_name!r} compares numbers or strings, not {_short(value)}; "
                "use '=' or '!=' to match null, a bool, a list or a dict.",
                key=field_name,
            )
        conditions.append((field_name, op, value))
    return conditions


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values: 1 == 1.0, but true is not 1 and [1] is not [true]."""
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def _matches(metadata: dict[str, Any], field_name: str, op: str, value: Any) -> bool:
    """Whether one condition holds; a version without the field matches no condition on it."""
    if field_name not in metadata:
        return False
    actual = metadata[field_name]
    if op in ("=", "=="):
        return _json_equal(actual, value)
    if op == "!=":
        return not _json_equal(actual, value)
    if not ((_is_number(actual) and _is_number(value)) or (isinstance(actual, str) and isinstance(value, str))):
        return False  # numbers compare with numbers, strings with strings
    return bool({"<": actual < value, "<=": actual <= value, ">": actual > value, ">=": actual >= value}[op])


def _order_key(value: Any) -> tuple[int, Any]:
    """Numbers (and bools) first, then strings, then lists and dicts, as SQLite's json_extract ordered them."""
    if isinstance(value, (int, float)):
        return (0, value)
    if isinstance(value, str):
        return (1, value)
    return (2, json.dumps(value, sort_keys=True))


def _kind_of(value: Any) -> str:
    """The JSON type of a metadata value, as the fields table records it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if _is_number(value):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _real(value: Any) -> float:
    """A number as SQLite's REAL: rounded (which keeps the order), a huge int clamped to infinity."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _text(value: str) -> str | None:
    """A string as SQLite can hold it, or None for one it cannot (a lone surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def _field_rows(name: str, version: int, metadata: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """The fields table's rows for one version: its top-level metadata, the key as JSON (any string fits)."""
    rows = []
    for key, value in metadata.items():
        kind = _kind_of(value)
        num = _real(value) if kind in ("number", "bool") else None
        text = _text(value) if kind == "string" else None
        if kind in ("array", "object"):
            text = json.dumps(value, sort_keys=True)  # ASCII: SQLite orders it as _order_key does
        rows.append((name, version, json.dumps(key), kind, num, text))
    return rows


def _candidates(field_name: str, op: str, value: Any) -> tuple[str, list[Any]]:
    """SQL for the ``(name, version)`` of every version that may meet one condition (never fewer than
    :func:`_matches` accepts: numbers compare as rounded floats, so ``<`` and ``>`` are asked as ``<=``
    and ``>=``). The key and the value are parameters; the operator is one of :data:`_OPERATORS`."""
    sql, params = "SELECT name, version FROM fields WHERE key = ?", [json.dumps(field_name)]
    kind = _kind_of(value)
    if op == "!=":
        return sql, params  # any version with the field
    if kind in ("number", "bool"):
        loose = {"=": "=", "==": "=", "<": "<=", "<=": "<=", ">": ">=", ">=": ">="}[op]
        return f"{sql} AND kind = ? AND num {loose} ?", [*params, kind, _real(value)]
    text = _text(value) if kind == "string" else None
    if text is not None:
        exact = "=" if op == "==" else op  # UTF-8 byte order is code point order, as Python compares
        return f"{sql} AND kind = 'string' AND (text {exact} ? OR text IS NULL)", [*params, text]
    return f"{sql} AND kind = ?", [*params, kind]  # null, a list, a dict: compared in Python


def cache_folder() -> str:
    """Where remote registries keep their index caches: ``$TORCHKEEP_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/torchkeep``, else ``~/.cache/torchkeep``."""
    explicit = os.environ.get(_CACHE_ENV)
    if explicit:
        return os.path.abspath(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "torchkeep")


def _cache_name(url: str) -> str:
    """The cache file of the registry at ``url``: one per URL, named by its hash (credentials never in it)."""
    return f"registry-{hashlib.sha256(url.encode('utf-8', 'surrogatepass')).hexdigest()[:32]}.sqlite"


class Registry:
    """Named, versioned model releases in a directory.

    Args:
        root: the registry's directory (created when first written): a path or a
            URL (``file://``, ``memory://STORE/KEY``, ``s3://BUCKET/PATH``), as
            :func:`torchkeep.load` takes.
        storage: keep it in this storage instead, with ``root`` as the folder key.
        cache_dir: where the index cache of a registry on an object store is kept
            (default: :func:`cache_folder`); unused for a local or memory registry.

    On an object store, registering takes a lease object on the store for a
    few requests' time; reads take no lock on the store. Two processes (or
    machines) may register at once: each version gets its own number.

    Reads work on a registry that cannot be written (a read-only filesystem or
    mount): the index is opened read-only, or replaced by one built in memory
    from the files. Writes to it raise :class:`~torchkeep.errors.StorageError`.

    Example:
        >>> registry = torchkeep.Registry("model-registry")
        >>> v = registry.register("classifier", model, metadata={"accuracy": 0.93}, aliases=["staging"])
        >>> registry.set_alias("classifier", "production", v.version)
        >>> registry.load_into(model, "classifier", "production")
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        storage: Storage | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._storage, self._prefix = resolve(root, storage)
        self.root = self._storage.describe(self._prefix)
        local = self._storage.local_path(self._prefix)
        self._local = local
        # None: the index lives only in memory (a memory storage, or no usable cache folder).
        self._index_path = os.path.join(local, _INDEX_NAME) if local is not None else None
        # On an object store (any storage with no local path that is not in memory): a local cache.
        self._cache = local is None and not isinstance(self._storage, MemoryStorage)
        if self._cache:
            folder = os.path.abspath(os.fspath(cache_dir)) if cache_dir is not None else cache_folder()
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError:
                self._cache = False  # no cache here: the in-memory index answers, from the store
            else:
                self._index_path = os.path.join(folder, _cache_name(self.root))
        self._memory_db: sqlite3.Connection | None = None  # the private index: built from the files
        self._memory_lock = threading.RLock()
        if self._index_path is not None and not self._cache:
            # Rebuilt on open when missing; a registry that cannot be written is read from its files.
            with contextlib.suppress(StorageError), _typed("open the registry index", self._index_path):
                if _lstat(self._index_path) is None:
                    self.rebuild_index()

    # -- keys and locking -----------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self._prefix, *parts) if p)

    def _version_key(self, name: str, version: int) -> str:
        return self._key("models", name, f"v{version}")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = FolderLock(self._storage, self._prefix, name=_LOCK_NAME, blocking=True)
        try:
            yield
        finally:
            lock.release()

    @contextlib.contextmanager
    def _index_locked(self) -> Iterator[None]:
        """The lock for writing the index file: the registry's own beside its files, or, for a cache,
        an ``flock`` beside the cache file (never the store's lease: reading must not write the store)."""
        if not self._cache:
            with self._locked():
                yield
            return
        assert self._index_path is not None
        folder, name = os.path.split(self._index_path)
        lock = FolderLock(LocalStorage(folder), "", name=f".{name}.lock", blocking=True, holder="another reader")
        try:
            yield
        finally:
            lock.release()

    # -- files: the source of truth -------------------------------------------------------

    def _file_versions(self, name: str) -> list[int]:
        return sorted(
            int(m.group(1)) for n in self._storage.list(self._key("models", name)) if (m := _VERSION_DIR.fullmatch(n))
        )

    def _read_version(self, name: str, version: int) -> ModelVersion:
        """The record of one version from its files.

        Raises:
            CorruptCheckpointError: its manifest is damaged, not a regular file, or its record is malformed.
            CheckpointNotFoundError: the folder holds no committed checkpoint.
        """
        key = self._version_key(name, version)
        path = self._storage.describe(key)
        manifest_path = self._storage.local_path(f"{key}/{MANIFEST_NAME}")
        if manifest_path is not None and (kind := _not_a_regular_file(manifest_path)) is not None:
            raise CorruptCheckpointError(
                f"The manifest {manifest_path!r} of {name} v{version} is {kind}, not a regular file; torchkeep "
                f"does not read it. The version is left out; delete it with delete({name!r}, {version}) or "
                "restore its files.",
                path=manifest_path,
                key=f"{name}/v{version}",
            )
        try:
            manifest = read_manifest(self._storage, key)
        except CheckpointNotFoundError as exc:
            raise CorruptCheckpointError(
                f"{path!r} is where {name} v{version} belongs, but it holds no committed checkpoint ({exc}). "
                f"It is left out; delete it with delete({name!r}, {version}) or restore its files.",
                path=path,
                key=f"{name}/v{version}",
            ) from exc
        record = manifest.metadata.get("registry") if isinstance(manifest.metadata, dict) else None
        problem = _record_problem(record, name, version)
        if problem is not None or not isinstance(record, dict):
            raise CorruptCheckpointError(
                f"{path!r} is not a usable registry version: the 'registry' record in its manifest {problem}. "
                f"It is left out of listings and the other versions are unaffected; delete it with "
                f"delete({name!r}, {version}) or restore its files.",
                path=path,
                key=f"{name}/v{version}",
            )
        return ModelVersion(
            name=name,
            version=version,
            path=path,
            created=record["created"],
            metadata=dict(record["metadata"]),
            tags=tuple(record["tags"]),
            description=record["description"],
            lineage=dict(record["lineage"]),
        )

    def _read_alias(self, name: str, alias: str) -> int:
        """The version an alias file points at, read without following links or blocking on a FIFO.

        Raises:
            CorruptCheckpointError: the alias is not a small regular file holding ``{"version": N}``.
            CheckpointNotFoundError: it vanished meanwhile.
        """
        key = self._key("models", name, "aliases", alias)
        where = self._storage.describe(key)
        fix = f"Remove it (remove_alias({name!r}, {alias!r})) or point it again with set_alias()."
        local = self._storage.local_path(key)
        try:
            if local is None:
                if self._storage.size(key) > _MAX_ALIAS_BYTES:
                    raise ValueError(f"it is over {_MAX_ALIAS_BYTES} bytes")
                raw = self._storage.read(key)
            else:
                st = _lstat(local)
                if st is None:
                    raise CheckpointNotFoundError(f"{name!r} has no alias {alias!r}.", path=where)
                if not stat.S_ISREG(st.st_mode):
                    raise ValueError(f"it is {_kind(st.st_mode)}, not a regular file; torchkeep does not open it")
                try:
                    fd = os.open(local, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        raise ValueError("it is a symbolic link; torchkeep does not follow it") from None
                    if exc.errno == errno.ENOENT:
                        raise CheckpointNotFoundError(f"{name!r} has no alias {alias!r}.", path=where) from exc
                    raise _storage_error("read the alias", local, exc) from exc
                try:
                    st = os.fstat(fd)  # what was opened, which a rename may have swapped since the lstat
                    if not stat.S_ISREG(st.st_mode):
                        raise ValueError(f"it is {_kind(st.st_mode)}, not a regular file; torchkeep does not read it")
                    if st.st_size > _MAX_ALIAS_BYTES:
                        raise ValueError(f"it is {st.st_size} bytes, over the {_MAX_ALIAS_BYTES}-byte limit")
                    raw = os.read(fd, _MAX_ALIAS_BYTES + 1)
                except OSError as exc:
                    raise _storage_error("read the alias", local, exc) from exc
                finally:
                    os.close(fd)
            return _parse_alias(raw)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise CorruptCheckpointError(
                f"The alias file {where!r} ({name}:{alias}) is not usable: {exc}. {fix}",
                path=where,
                key=f"{name}/aliases/{alias}",
            ) from None

    def _file_aliases(self, name: str) -> tuple[dict[str, int], dict[str, CorruptCheckpointError]]:
        """The usable aliases of a model, and the damaged ones with why."""
        good: dict[str, int] = {}
        bad: dict[str, CorruptCheckpointError] = {}
        for alias in self._storage.list(self._key("models", name, "aliases")):
            if not _NAME.fullmatch(alias):
                continue  # not a name the registry writes
            try:
                good[alias] = self._read_alias(name, alias)
            except CheckpointNotFoundError:
                continue  # removed meanwhile
            except CorruptCheckpointError as exc:
                bad[alias] = exc
        return good, bad

    def _stamp(self, key: str) -> Any:
        """What changes when the entry at ``key`` is replaced or written: its lstat on a disk, a CRC in memory."""
        local = self._storage.local_path(key)
        if local is not None:
            st = _lstat(local)
            if st is None:
                return None
            return [st.st_mode, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink, st.st_size]
        try:
            return zlib.crc32(self._storage.read(key))
        except CheckpointNotFoundError:
            return None

    def _manifest_stamp(self, name: str, version: int) -> str:
        return json.dumps(self._stamp(f"{self._version_key(name, version)}/{MANIFEST_NAME}"))

    def _fingerprint(self, name: str) -> str:
        """A cheap summary of a model's files that changes whenever a version folder or an alias does.

        On a disk: the lstat of the model's folder and of its aliases folder (adding, removing
        or renaming an entry changes its times, link count or size), whatever the number of
        versions. Elsewhere: the names of the version folders.
        """
        folder, aliases = self._key("models", name), self._key("models", name, "aliases")
        if self._storage.local_path(folder) is not None:
            stamp = self._stamp(folder)
            head: list[Any] = [] if stamp is None else [stamp, self._stamp(aliases)]
        else:
            head = [e for e in self._storage.list(folder) if _VERSION_DIR.fullmatch(e)]
        entries = head + [["aliases", a, self._stamp(f"{aliases}/{a}")] for a in self._storage.list(aliases)]
        return json.dumps(entries)

    def _scan(self, names: Sequence[str] | None) -> dict[str, str]:
        """The fingerprint of each model named (of every model when None)."""
        if names is None:
            names = [n for n in self._storage.list(self._key("models")) if _NAME.fullmatch(n)]
        return {name: self._fingerprint(name) for name in names}

    # -- the index: derived from the files --------------------------------------------------

    def _forget(self, conn: sqlite3.Connection, name: str, version: int) -> None:
        for table in ("versions", "entries", "fields"):
            conn.execute(f"DELETE FROM {table} WHERE name = ? AND version = ?", (name, version))  # a fixed name
        conn.execute("DELETE FROM problems WHERE name = ? AND item = ?", (name, f"v{version}"))

    def _index_version(self, conn: sqlite3.Connection, name: str, version: int, stamp: str) -> None:
        """Add one version's rows (``stamp`` taken before reading it); a damaged one is kept as a problem."""
        conn.execute("INSERT INTO entries VALUES (?, ?, ?)", (name, version, stamp))
        try:
            v = self._read_version(name, version)
        except StorageError:
            raise  # the disk failed: nothing to conclude about the version
        except TorchkeepError as exc:  # a damaged version stays out; the listings name it
            where = exc.path or self._storage.describe(self._version_key(name, version))
            conn.execute("INSERT INTO problems VALUES (?, ?, ?, ?)", (name, f"v{version}", where, str(exc)))
            return
        conn.execute(
            "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (name, version, v.path, v.created, v.description, json.dumps(list(v.tags)),
             json.dumps(v.metadata), json.dumps(v.lineage)),
        )  # fmt: skip
        conn.executemany("INSERT INTO fields VALUES (?, ?, ?, ?, ?, ?)", _field_rows(name, version, v.metadata))

    def _sync_model(self, conn: sqlite3.Connection, name: str, fingerprint: str, *, added: int | None = None) -> None:
        """Make the index agree with the files for one model (``fingerprint`` taken before reading them).

        With ``added`` (known to be the only new version): indexes just that one. Otherwise lists
        the versions and reads those that are new or whose manifest's stamp changed (a copied
        registry: new inodes), and forgets the versions gone.
        """
        known: dict[int, str] = {}
        if added is not None:  # nothing else changed: no listing, no comparing
            listed = [added]
        else:
            known = dict(conn.execute("SELECT version, stamp FROM entries WHERE name = ?", (name,)).fetchall())
            listed = self._file_versions(name)
            for version in set(known).difference(listed):
                self._forget(conn, name, version)
        for version in listed:
            stamp = self._manifest_stamp(name, version)
            if known.get(version) != stamp:
                self._forget(conn, name, version)
                self._index_version(conn, name, version, stamp)
        conn.execute("DELETE FROM aliases WHERE name = ?", (name,))
        conn.execute("DELETE FROM problems WHERE name = ? AND item GLOB 'aliases/*'", (name,))
        good, bad = self._file_aliases(name)
        conn.executemany("INSERT INTO aliases VALUES (?, ?, ?)", [(name, a, v) for a, v in good.items()])
        for alias, damage in bad.items():
            conn.execute(
                "INSERT INTO problems VALUES (?, ?, ?, ?)", (name, f"aliases/{alias}", damage.path or "", str(damage))
            )
        conn.execute("DELETE FROM files WHERE name = ?", (name,))
        if fingerprint != _EMPTY:
            conn.execute("INSERT INTO files VALUES (?, ?)", (name, fingerprint))

    def _sync(
        self,
        conn: sqlite3.Connection,
        fingerprints: Mapping[str, str],
        *,
        every: bool,
        added: tuple[str, int] | None = None,
    ) -> None:
        """Sync every model whose fingerprint changed (``every``: models gone count too); ``added`` as in
        :meth:`_update_index`."""
        for name in self._stale(conn, fingerprints, every=every):
            new = added[1] if added is not None and added[0] == name else None
            self._sync_model(conn, name, fingerprints.get(name, _EMPTY), added=new)

    @staticmethod
    def _stale(conn: sqlite3.Connection, fingerprints: Mapping[str, str], *, every: bool) -> list[str]:
        """The models whose files changed since the index was written (``every``: models gone count too)."""
        stored = dict(conn.execute("SELECT name, fingerprint FROM files").fetchall())
        names = set(fingerprints) | (set(stored) if every else set())
        return sorted(n for n in names if stored.get(n, _EMPTY) != fingerprints.get(n, _EMPTY))

    def _check_current(self, conn: sqlite3.Connection, name: str, version: int) -> None:
        """Raise :class:`_Changed` when a version's manifest changed on disk since it was indexed."""
        row = conn.execute("SELECT stamp FROM entries WHERE name = ? AND version = ?", (name, version)).fetchone()
        if row is None or row[0] != self._manifest_stamp(name, version):
            raise _Changed(name)

    def _private_index(self) -> sqlite3.Connection:
        """The in-memory index (caller holds ``_memory_lock``)."""
        if self._memory_db is None:
            conn = sqlite3.connect(":memory:", check_same_thread=False)
            conn.executescript(_SCHEMA)
            self._memory_db = conn
        return self._memory_db

    def _answer(self, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], _T], warn: Sequence[str] | None,
                warns: bool) -> _T:  # fmt: skip
        result = fn(conn)  # raises _Changed before any warning is given
        if warns:
            self._warn_problems(conn, warn)
        return result

    def _query(self, names: Sequence[str] | None, fn: Callable[[sqlite3.Connection], _T], *, warn: bool = False) -> _T:
        """Run ``fn`` on an index that agrees with the files of ``names`` (of every model when None).

        The on-disk index when it is current; otherwise (missing, damaged, behind the
        files, unreadable, or a version ``fn`` returns changed since) the private in-memory
        one, brought up to date from the files. ``warn``: name the damaged entries of ``names``.
        """
        with _typed("read the registry", self.root):
            fingerprints = self._scan(names)
            every = names is None
            if self._index_path is not None:
                if self._cache:
                    self._refresh_cache(fingerprints, every=every)
                conn = self._disk_index_for_reading()
                if conn is not None:
                    try:
                        if not self._stale(conn, fingerprints, every=every):
                            return self._answer(conn, fn, names, warn)
                    except _Changed:
                        pass  # a manifest changed in place: this read uses the files
                    except sqlite3.DatabaseError as exc:
                        if _sqlite_kind(exc) != "damaged":
                            raise
                        self._rebuilt_after_damage(exc)  # found past the first page; this read uses the files
                    finally:
                        conn.close()
            with self._memory_lock:
                conn = self._private_index()
                self._sync(conn, fingerprints, every=every)
                conn.commit()
                for _ in range(5):  # each round re-reads what changed; only a file changing nonstop goes on
                    try:
                        return self._answer(conn, fn, names, warn)
                    except _Changed as changed:
                        fingerprint = fingerprints.get(changed.name, _EMPTY)
                        self._sync_model(conn, changed.name, fingerprint)
                        conn.commit()
                raise StorageError(
                    f"The files of {self.root!r} kept changing while they were read; retry when no one writes them.",
                    path=self.root,
                )

    def _refresh_cache(self, fingerprints: Mapping[str, str], *, every: bool) -> None:
        """Bring the index cache of a remote registry in line with the store for the models of
        ``fingerprints`` (taken from the store just before). A cache that cannot be written is left
        as it is: the caller then finds it behind and answers from the store."""
        conn = self._disk_index_for_reading()
        if conn is not None:
            try:
                if not self._stale(conn, fingerprints, every=every):
                    return
            except sqlite3.Error:
                pass  # damaged past the first page: rewritten below
            finally:
                conn.close()
        try:
            with self._index_locked():
                conn = self._open_for_write()
                try:
                    with conn:
                        self._sync(conn, fingerprints, every=every)
                finally:
                    conn.close()
        except (OSError, sqlite3.Error, StorageError):
            pass  # the cache folder is read-only, full or damaged: the store answers

    def _disk_index_for_reading(self) -> sqlite3.Connection | None:
        """The on-disk index, opened to read, or None when there is none to use (the files answer)."""
        path = self._index_path
        assert path is not None
        for attempt in range(2):
            st = _lstat(path)
            if st is None:
                return None
            try:
                if not stat.S_ISREG(st.st_mode):
                    raise _Damaged(f"it is {_kind(st.st_mode)}, not a regular file")
                # SQLite writes the -shm file even to read a WAL database. Where the -wal and -shm files
                # are not plain files, or cannot be made (a read-only filesystem), read the main file as
                # it stands: immutable, no locks, nothing written; a lagging main file shows as stale.
                if all(_not_a_regular_file(path + s) is None for s in ("-wal", "-shm")):
                    try:
                        return _open_index(path)
                    except _Damaged:
                        raise
                    except sqlite3.Error:
                        pass  # cannot be opened to write: read it immutable
                try:
                    return _open_index(path, immutable=True)
                except _Damaged:
                    raise
                except sqlite3.Error:
                    return None  # unreadable: the files answer
            except _Damaged as exc:
                if attempt or not self._rebuilt_after_damage(exc):
                    return None
        return None

    def _rebuilt_after_damage(self, exc: sqlite3.Error) -> bool:
        """Rebuild a damaged (or outdated) index, with a warning; False when it cannot be rebuilt here."""
        state = "outdated" if isinstance(exc, _Outdated) else "damaged"
        try:
            self.rebuild_index()
        except StorageError as failure:
            warnings.warn(
                f"The registry index {self._index_path!r} is {state} ({exc}) and could not be rebuilt ({failure}); "
                "reading from the files instead. Call rebuild_index() where the registry is writable.",
                RuntimeWarning,
                stacklevel=5,
            )
            return False
        if not isinstance(exc, _Outdated):
            warnings.warn(
                f"The registry index {self._index_path!r} was damaged ({exc}); it was rebuilt from the files.",
                RuntimeWarning,
                stacklevel=5,
            )
        return True

    def _open_for_write(self) -> sqlite3.Connection:
        """The on-disk index opened to write (caller holds the lock); a missing or damaged one is rebuilt."""
        path = self._index_path
        assert path is not None
        if any(_not_a_regular_file(path + s) is not None for s in ("", "-wal", "-shm")) or _lstat(path) is None:
            self._write_new_index()
        try:
            conn = _open_index(path)
        except _Damaged as exc:
            if not isinstance(exc, _Outdated):
                warnings.warn(
                    f"The registry index {path!r} was damaged ({exc}); it is rebuilt from the files.",
                    RuntimeWarning,
                    stacklevel=4,
                )
            self._write_new_index()
            conn = _open_index(path)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def _next_version(self, name: str) -> tuple[int, bool, str]:
        """The number the next version of ``name`` gets, one past its largest version folder, whether
        the index was current for ``name``, and the fingerprint of ``name`` it was checked against
        (caller holds the lock). Read from the index when its fingerprint of ``name`` is current,
        without listing the versions; from the listing otherwise."""
        fingerprint = self._fingerprint(name)
        query = (
            "SELECT MAX(version) FROM entries WHERE name = ? "
            "AND EXISTS (SELECT 1 FROM files WHERE name = ? AND fingerprint = ?)"
        )
        try:
            if self._index_path is None:
                with self._memory_lock:
                    row = self._private_index().execute(query, (name, name, fingerprint)).fetchone()
            elif _lstat(self._index_path) is not None:
                conn = _open_index(self._index_path)
                try:
                    row = conn.execute(query, (name, name, fingerprint)).fetchone()
                finally:
                    conn.close()
            else:
                row = None
        except sqlite3.Error:
            row = None  # no usable index: the files answer (writing the index later rebuilds it)
        if row is None or row[0] is None:
            return max(self._file_versions(name), default=0) + 1, False, fingerprint
        return int(row[0]) + 1, True, fingerprint

    def _only_added(self, before: list[int] | None, folder: str) -> bool:
        """Whether one folder was added to ``folder`` since its stamp ``before`` (its link count, where the
        filesystem counts subfolders): the version just written, so the index needs no listing of it."""
        after = self._stamp(folder)
        return bool(before and after and before[1] == after[1] and before[4] >= 2 and after[4] == before[4] + 1)

    def _update_index(self, *, added: tuple[str, int] | None = None, before: str | None = None) -> None:
        """Bring the index in line with the files for every model that changed (caller holds the lock).

        ``added``: ``(name, version)`` when that version is all that changed in the folder of ``name``
        since the index was last current for it (register checked): it is indexed without a listing.
        ``before``: on a store whose fingerprint lists the versions, the fingerprint of ``name`` the index
        was current for; ``added`` then holds only if the listing now is exactly that one plus ``version``.
        """
        fingerprints = self._scan(None)
        if added is not None and before is not None:
            now = _version_names(fingerprints.get(added[0], _EMPTY))
            if now != sorted([*_version_names(before), f"v{added[1]}"], key=_version_number):
                added = None  # another writer's version appeared too: list and compare
        if self._index_path is None:
            with self._memory_lock:
                conn = self._private_index()
                self._sync(conn, fingerprints, every=True, added=added)
                conn.commit()
            return
        with self._index_locked() if self._cache else contextlib.nullcontext():
            conn = self._open_for_write()
            try:
                with conn:
                    self._sync(conn, fingerprints, every=True, added=added)
            finally:
                conn.close()

    def _write_new_index(self) -> list[tuple[str, str]]:
        """Write a whole new index beside the old one and rename it into place (caller holds the lock).

        Returns the damaged entries left out, as ``(path, reason)``.
        """
        path = self._index_path
        assert path is not None
        folder = os.path.dirname(path)
        prefix = f".{os.path.basename(path)}.rebuild-"  # a cache folder holds several registries' caches
        for leftover in os.listdir(folder):  # under the lock, any other is a dead rebuild's
            if leftover.startswith(prefix):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, leftover))
        staging = os.path.join(folder, f"{prefix}{os.getpid()}-{secrets.token_hex(4)}")
        try:
            conn = sqlite3.connect(staging)
            try:
                conn.executescript(_SCHEMA)
                with conn:
                    self._sync(conn, self._scan(None), every=True)
                problems = conn.execute("SELECT path, reason FROM problems ORDER BY name, item").fetchall()
                conn.execute("PRAGMA journal_mode=WAL")  # persistent: every later open uses the WAL
            finally:
                conn.close()
            fd = os.open(staging, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if _not_a_regular_file(path) == "a directory":
                raise StorageError(
                    f"Could not replace the registry index {path!r}: it is a directory. Move it away; "
                    "rebuild_index() then writes a new index.",
                    path=path,
                )
            for suffix in ("-wal", "-shm"):  # the old index's: they must not be replayed into the new one
                if _lstat(path + suffix) is not None:
                    os.remove(path + suffix)
            os.replace(staging, path)  # also replaces a link or a FIFO planted there, never what it points at
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            for suffix in ("", "-journal", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.remove(staging + suffix)
            raise
        return problems

    def rebuild_index(self) -> None:
        """Rebuild the whole index from the files: a new index replaces the old one (missing, stale or damaged).

        Damaged versions and aliases are left out, each named in a ``RuntimeWarning``.

        Raises:
            StorageError: the index cannot be written (a read-only filesystem, a full disk).
        """
        if self._index_path is None:
            with self._memory_lock:
                self._memory_db = None
                conn = self._private_index()
                self._sync(conn, self._scan(None), every=True)
                conn.commit()
                problems = conn.execute("SELECT path, reason FROM problems ORDER BY name, item").fetchall()
        else:
            with _typed("rebuild the registry index", self._index_path), self._index_locked():
                problems = self._write_new_index()
        for where, reason in problems:
            warnings.warn(f"Skipping {where}: {reason}", RuntimeWarning, stacklevel=2)

    # -- writing --------------------------------------------------------------------------

    def _index_after(self, done: str, exc: BaseException, *, key: str, advice: str = "") -> StorageError:
        """The error for a write whose files were committed but whose index update failed."""
        reason, _ = _reason_and_hint(exc)
        where = self._index_path or "the in-memory index"
        return StorageError(
            f"{done}, but the registry index {where!r} could not be updated: {reason}. The files are the "
            "truth and reads already see them; the index heals at the next write to this registry or with "
            f"rebuild_index().{advice}",
            path=self.root,
            key=key,
        )

    def register(
        self,
        name: str,
        source: Any,
        *,
        metadata: dict[str, Any] | None = None,
        tags: Sequence[str] | None = None,
        aliases: Sequence[str] = (),
        description: str | None = None,
    ) -> ModelVersion:
        """Register a new, immutable version of ``name``; its number is the next free one.

        Args:
            name: the model's name.
            source: an ``nn.Module``, a state dict, a checkpoint path (any format
                :func:`torchkeep.load` reads), or a :class:`CheckpointRecord`
                (``manager.best()``); lineage (source, step, metrics) is recorded.
            metadata: plain JSON to search by (``{"accuracy": 0.93}``).
            tags: labels.
            aliases: names that will point at this version (``["staging"]``).
            description: free text.

        Raises:
            StorageError: the registry cannot be written (read-only, disk full). When the
                version's files were stored but the index could not be updated, the message
                says which version was stored and ``.key`` is ``"NAME/vN"``: do not register
                it again.
        """
        _check_name("Model name", name)
        meta = check_metadata(metadata)
        tag_list = list(tags or ())
        if isinstance(tags, str) or not all(isinstance(t, str) for t in tag_list):
            raise InvalidArgumentError(f"tags must be a list of strings, not {_short(tags)}.")
        if description is not None and not isinstance(description, str):
            raise InvalidArgumentError(f"description must be a string or None, not {type(description).__name__}.")
        for alias in aliases:
            self._check_alias(alias)
        state, lineage = self._gather(source)
        with _typed(f"register a version of {name!r} in", self.root), self._locked():
            folder = self._key("models", name)
            local = self._storage.local_path(folder) is not None
            before = self._stamp(folder) if local else None
            version, current, fingerprint = self._next_version(name)
            taken = False
            for _ in range(_MAX_VERSION_TRIES):
                key = self._version_key(name, version)
                record = {
                    "name": name,
                    "version": version,
                    "created": utc_now(),
                    "metadata": meta,
                    "tags": tag_list,
                    "description": description,
                    "lineage": lineage,
                }
                try:
                    if self._storage.exists(key):  # taken by a writer that did not hold the lock
                        raise CheckpointExistsError(f"{self._storage.describe(key)!r} exists.")
                    save(state, key, metadata={"registry": record}, storage=self._storage)
                    break
                except CheckpointExistsError:  # or committed by another writer while this one uploaded
                    taken = True
                    version = max(version + 1, max(self._file_versions(name), default=0) + 1)
            else:
                raise StorageError(
                    f"Could not register {name!r} in {self.root!r}: {_MAX_VERSION_TRIES} version numbers in a "
                    "row were taken by other writers meanwhile. Retry when fewer writers register at once.",
                    path=self.root,
                )
            verify(key, storage=self._storage)  # the stored bytes are exactly what was meant
            stored = f"{name} v{version} was stored at {self._storage.describe(key)!r}"
            again = f" Do not register it again: that would add v{version + 1}."
            for alias in aliases:
                try:
                    self._write_alias(name, alias, version)
                except (OSError, TorchkeepError) as exc:
                    reason, hint = _reason_and_hint(exc)
                    raise StorageError(
                        f"{stored}, but its alias {alias!r} could not be written: {reason}. {hint} Then point "
                        f"it with set_alias({name!r}, {alias!r}, {version}).{again}",
                        path=self._storage.describe(key),
                        key=f"{name}/v{version}",
                    ) from exc
            try:
                only_added = current and not taken and (not local or self._only_added(before, folder))
                self._update_index(added=(name, version) if only_added else None, before=None if local else fingerprint)
            except (OSError, sqlite3.Error, TorchkeepError) as exc:
                raise self._index_after(stored, exc, key=f"{name}/v{version}", advice=again) from exc
        return self.get(name, version)

    def _gather(self, source: Any) -> tuple[Any, dict[str, Any]]:
        if isinstance(source, nn.Module):
            return source.state_dict(), {"source": "module", "class": type(source).__qualname__}
        if isinstance(source, CheckpointRecord):
            tree = load(source.path)
            lineage = {"source": "checkpoint", "checkpoint": source.path, "step": source.step,
                       "metrics": {k: v for k, v in source.metrics.items() if math.isfinite(v)}}  # fmt: skip
            return tree, lineage
        if isinstance(source, Mapping):
            return dict(source), {"source": "state_dict"}
        if isinstance(source, (str, os.PathLike)):
            return load(source), {"source": "file", "checkpoint": os.fspath(source)}
        raise InvalidArgumentError(
            f"Cannot register a {type(source).__name__}: pass an nn.Module, a state dict, a checkpoint path "
            "or a CheckpointRecord."
        )

    def _check_alias(self, alias: str) -> None:
        _check_name("Alias", alias)
        if alias.isdigit() or alias == "latest":
            raise InvalidArgumentError(f"Alias {alias!r} would be read as a version; choose another.")

    def _write_alias(self, name: str, alias: str, version: int) -> None:
        with self._storage.begin(self._key("models", name, "aliases", alias), directory=False) as txn, txn.open() as f:
            f.write(json.dumps({"version": version, "updated": utc_now()}).encode())

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point ``alias`` (``"production"``) at a version; an alias moves, versions never change."""
        _check_name("Model name", name)
        self._check_alias(alias)
        _check_version(name, version)
        with _typed(f"set the alias {name}:{alias} in", self.root), self._locked():
            if version not in self._file_versions(name):
                raise CheckpointNotFoundError(f"{name!r} has no version {version} in {self.root!r}.", path=self.root)
            self._read_version(name, version)  # a damaged version raises CorruptCheckpointError naming it
            self._write_alias(name, alias, version)
            try:
                self._update_index()
            except (OSError, sqlite3.Error, TorchkeepError) as exc:
                raise self._index_after(f"{name}:{alias} now points at v{version}", exc, key=alias) from exc

    def remove_alias(self, name: str, alias: str) -> None:
        """Remove an alias; the version it pointed at stays. Also removes a damaged alias file."""
        _check_name("Model name", name)
        _check_name("Alias", alias)
        with _typed(f"remove the alias {name}:{alias} from", self.root), self._locked():
            self._storage.delete(self._key("models", name, "aliases", alias))
            try:
                self._update_index()
            except (OSError, sqlite3.Error, TorchkeepError) as exc:
                raise self._index_after(f"The alias {name}:{alias} was removed", exc, key=alias) from exc

    def delete(self, name: str, version: int, *, force: bool = False) -> None:
        """Delete a version. Refused while an alias points at it, unless ``force`` (which removes those aliases)."""
        _check_name("Model name", name)
        _check_version(name, version)
        with _typed(f"delete {name} v{version} from", self.root), self._locked():
            if version not in self._file_versions(name):
                raise CheckpointNotFoundError(f"{name!r} has no version {version} in {self.root!r}.", path=self.root)
            pointing = sorted(a for a, v in self._file_aliases(name)[0].items() if v == version)
            if pointing and not force:
                raise InvalidArgumentError(
                    f"{name} v{version} is what {pointing} point at; move or remove them first, or pass force=True."
                )
            for alias in pointing:
                self._storage.delete(self._key("models", name, "aliases", alias))
            self._storage.delete(self._version_key(name, version))
            try:
                self._update_index()
            except (OSError, sqlite3.Error, TorchkeepError) as exc:
                raise self._index_after(f"{name} v{version} was deleted", exc, key=f"{name}/v{version}") from exc

    # -- reading --------------------------------------------------------------------------

    def _warn_problems(self, conn: sqlite3.Connection, names: Sequence[str] | None) -> None:
        sql = "SELECT path, reason FROM problems"
        params: tuple[str, ...] = ()
        if names is not None:
            sql, params = sql + f" WHERE name IN ({', '.join('?' * len(names))})", tuple(names)
        for where, reason in conn.execute(sql + " ORDER BY name, item", params).fetchall():
            warnings.warn(f"Skipping {where}: {reason}", RuntimeWarning, stacklevel=5)

    def models(self) -> list[str]:
        """Every model name with at least one usable version, sorted; damaged entries are skipped with a warning."""

        def run(conn: sqlite3.Connection) -> list[str]:
            latest = conn.execute("SELECT name, MAX(version) FROM versions GROUP BY name ORDER BY name").fetchall()
            for name, version in latest:  # the version that makes each model listed is still what was indexed
                self._check_current(conn, name, version)
            return [name for name, _ in latest]

        return self._query(None, run, warn=True)

    def _row(self, conn: sqlite3.Connection, row: tuple[Any, ...]) -> ModelVersion:
        name, version, _, created, description, tags, metadata, lineage = row
        self._check_current(conn, name, version)
        path = self._storage.describe(self._version_key(name, version))  # where this registry sees it now
        aliases = tuple(a for (a,) in conn.execute(
            "SELECT alias FROM aliases WHERE name = ? AND version = ? ORDER BY alias", (name, version)))  # fmt: skip
        return ModelVersion(name, version, path, created, json.loads(metadata), tuple(json.loads(tags)),
                            description, json.loads(lineage), aliases)  # fmt: skip

    def versions(self, name: str) -> list[ModelVersion]:
        """Every usable version of ``name``, oldest first; damaged ones are skipped with a warning naming them."""
        _check_name("Model name", name)

        def run(conn: sqlite3.Connection) -> list[ModelVersion]:
            rows = conn.execute("SELECT * FROM versions WHERE name = ? ORDER BY version", (name,)).fetchall()
            return [self._row(conn, row) for row in rows]

        return self._query([name], run, warn=True)

    def _damage(self, conn: sqlite3.Connection, name: str, item: str) -> CorruptCheckpointError | None:
        row = conn.execute("SELECT path, reason FROM problems WHERE name = ? AND item = ?", (name, item)).fetchone()
        return None if row is None else CorruptCheckpointError(row[1], path=row[0], key=f"{name}/{item}")

    def _resolve(self, conn: sqlite3.Connection, name: str, version: int | str | None) -> int:
        if version is None or version == "latest":
            row = conn.execute("SELECT MAX(version) FROM versions WHERE name = ?", (name,)).fetchone()
            if row[0] is None:
                damaged = [r[0] for r in conn.execute("SELECT item FROM problems WHERE name = ? AND item LIKE 'v%'",
                                                       (name,))]  # fmt: skip
                if damaged:
                    raise CorruptCheckpointError(
                        f"{name!r} in {self.root!r} has no usable version: {', '.join(damaged)} are damaged "
                        f"({self._damage(conn, name, damaged[-1])}).",
                        path=self.root,
                        key=name,
                    )
                raise CheckpointNotFoundError(f"The registry {self.root!r} has no model {name!r}.", path=self.root)
            return int(row[0])
        if isinstance(version, int):
            return version
        row = conn.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, version)).fetchone()
        if row is None:
            damage = self._damage(conn, name, f"aliases/{version}")
            if damage is not None:
                raise damage
            raise CheckpointNotFoundError(f"{name!r} has no alias {version!r} in {self.root!r}.", path=self.root)
        return int(row[0])

    def get(self, name: str, version: int | str | None = None) -> ModelVersion:
        """The record of a version (an int), an alias (``"production"``), or the latest usable one (None).

        Raises:
            CheckpointNotFoundError: no such model, version or alias.
            CorruptCheckpointError: that version (or alias file) is damaged; the message names it.
        """
        _check_name("Model name", name)
        if isinstance(version, bool) or not isinstance(version, (int, str, type(None))):
            raise InvalidArgumentError(f"version must be an int, an alias or None, not {version!r}.")
        if isinstance(version, str) and version != "latest":
            _check_name("Alias", version)

        def run(conn: sqlite3.Connection) -> ModelVersion:
            number = self._resolve(conn, name, version)
            row = conn.execute("SELECT * FROM versions WHERE name = ? AND version = ?", (name, number)).fetchone()
            if row is None:
                damage = self._damage(conn, name, f"v{number}")
                if damage is not None:
                    self._check_current(conn, name, number)  # not repaired in place since
                    raise damage
                raise CheckpointNotFoundError(f"{name!r} has no version {number} in {self.root!r}.", path=self.root)
            return self._row(conn, row)

        return self._query([name], run)

    def load(self, name: str, version: int | str | None = None, **kwargs: Any) -> Any:
        """Load a version's state dict; ``kwargs`` go to :func:`torchkeep.load`."""
        v = self.get(name, version)
        return load(self._version_key(name, v.version), storage=self._storage, **kwargs)

    def load_into(self, target: Any, name: str, version: int | str | None = None, **kwargs: Any) -> LoadReport:
        """Load a version into a model; ``kwargs`` and the report are those of :func:`torchkeep.load_into`."""
        v = self.get(name, version)
        return load_into(target, self._version_key(name, v.version), storage=self._storage, **kwargs)

    def search(
        self,
        name: str | None = None,
        *,
        where: Mapping[str, Any] | None = None,
        order_by: str | None = None,
        descending: bool = True,
        limit: int | None = None,
    ) -> list[ModelVersion]:
        """Versions whose metadata match ``where``, ordered by a metadata field.

        Args:
            name: one model, or None for all.
            where: ``{"accuracy": (">=", 0.9), "dataset": "imagenet"}``: a value is an
                equality test (JSON equality: ``None`` matches null, a list or dict matches
                an equal one), a ``(operator, value)`` pair one of ``= == != < <= > >=``;
                ``< <= > >=`` compare numbers with numbers and strings with strings. A field
                is a top-level metadata key, any string. A version without the field
                matches no condition on it.
            order_by: a metadata field; versions without it (or with null) come last.
            descending: largest first (default).
            limit: at most this many.

        Raises:
            InvalidArgumentError: a malformed condition, an unknown operator, a value
                metadata cannot hold, or an ordering operator with a null, bool, list or dict.
        """
        if name is not None:
            _check_name("Model name", name)
        conditions = _parse_where(where)
        if order_by is not None and not isinstance(order_by, str):
            raise InvalidArgumentError(f"order_by must be a metadata field name (a string), not {order_by!r}.")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
            raise InvalidArgumentError(f"limit must be an int >= 0 or None, not {limit!r}.")

        # SQL picks the candidates through the fields index and orders them by the order_by field's
        # indexed value; _matches and _order_key then decide exactly, on the rows up to the limit.
        parts = [_candidates(f, op, value) for f, op, value in conditions]
        sql = f"SELECT v.*, {'o.kind, o.num' if order_by is not None else 'NULL, NULL'} FROM versions v"
        params: list[Any] = [p for _, part_params in parts for p in part_params]
        if parts:
            chosen = " INTERSECT ".join(part for part, _ in parts)
            sql += f" JOIN ({chosen}) c ON v.name = c.name AND v.version = c.version"
        if order_by is not None:
            sql += " LEFT JOIN fields o ON o.name = v.name AND o.version = v.version AND o.key = ?"
            params.append(json.dumps(order_by))
        if name is not None:
            sql += " WHERE v.name = ?"
        if order_by is not None:
            way = "DESC" if descending else "ASC"
            sql += (
                " ORDER BY o.kind IS NULL OR o.kind = 'null', CASE o.kind WHEN 'string' THEN 1 WHEN 'array' THEN 2 "
                f"WHEN 'object' THEN 2 ELSE 0 END {way}, o.num {way}, o.text {way}, v.name, v.version"
            )
        else:
            sql += " ORDER BY v.name, v.version"

        def run(conn: sqlite3.Connection) -> list[ModelVersion]:
            # A string SQLite cannot hold (a lone surrogate) has no text to order by: then order all in Python.
            unordered = (
                order_by is not None
                and conn.execute(
                    "SELECT 1 FROM fields WHERE key = ? AND kind = 'string' AND text IS NULL LIMIT 1", params[-1:]
                ).fetchone()
            )
            found: list[tuple[Any, ...]] = []
            last = None
            for row in conn.execute(sql, [*params, name] if name is not None else params):
                tie = row[9] if row[8] in ("number", "bool") else None  # numbers tie as rounded floats
                if limit is not None and len(found) >= limit and not unordered and (tie is None or tie != last):
                    break
                if conditions:
                    meta = json.loads(row[6])
                    if not all(_matches(meta, f, op, value) for f, op, value in conditions):
                        continue
                found.append(row)
                last = tie
            if order_by is not None:
                values = [json.loads(row[6]).get(order_by) for row in found]
                present = [(v, row) for v, row in zip(values, found, strict=True) if v is not None]
                present.sort(key=lambda vr: _order_key(vr[0]), reverse=bool(descending))
                found = [row for _, row in present] + [row for v, row in zip(values, found, strict=True) if v is None]
            return [self._row(conn, row[:8]) for row in (found if limit is None else found[:limit])]

        return self._query(None if name is None else [name], run, warn=True)

    def diff(self, name: str, a: int | str, b: int | str) -> VersionDiff:
        """Compare two versions' tensors: added and removed keys, shape changes, max absolute difference."""
        va, vb = self.get(name, a), self.get(name, b)
        added, removed, changes = compare_tensors(
            flatten_tensors(self.load(name, va.version)), flatten_tensors(self.load(name, vb.version))
        )
        return VersionDiff(
            name=name, a=va.version, b=vb.version, added=added, removed=removed,
            shape_changed=[(c.key, c.shape_a, c.shape_b) for c in changes if c.max_abs is None],
            max_abs_diff={c.key: c.max_abs for c in changes if c.max_abs is not None},
        )  # fmt: skip
