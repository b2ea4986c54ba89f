"""Registry: named, immutable, versioned model releases with aliases and a queryable index.

Layout under the root (the files are the source of truth; the index is derived)::

    models/NAME/v1/              a native checkpoint; its manifest metadata holds the
    models/NAME/v2/              version's record (metadata, tags, description, lineage)
    models/NAME/aliases/ALIAS    {"version": 2} (written atomically; may move)
    index.sqlite                 SQLite (WAL) index for queries, rebuilt from the files when missing
    .registry.lock               serializes writers across processes

Registering takes the lock, picks the next version number from the files,
writes and verifies the checkpoint, then updates the index: two processes
registering at once never get the same number and never lose a registration.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from torchkeep.compare import compare_tensors, flatten_tensors
from torchkeep.errors import (
    CheckpointNotFoundError,
    InvalidArgumentError,
    TorchkeepError,
)
from torchkeep.formats.native import read_manifest
from torchkeep.loading import load, verify
from torchkeep.locking import FolderLock
from torchkeep.manifest import check_metadata, utc_now
from torchkeep.model_loading import load_into
from torchkeep.report import LoadReport
from torchkeep.retention import CheckpointRecord
from torchkeep.saving import save
from torchkeep.storage import Storage, resolve

__all__ = ["ModelVersion", "Registry", "VersionDiff"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION_DIR = re.compile(r"^v(\d+)$")
_OPERATORS = {"=": "=", "==": "=", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL, version INTEGER NOT NULL, path TEXT NOT NULL, created TEXT NOT NULL,
    description TEXT, tags TEXT NOT NULL, metadata TEXT NOT NULL, lineage TEXT NOT NULL,
    PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (name, alias));
"""


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
    if not isinstance(value, str) or not _NAME.match(value) or value in (".", ".."):
        raise InvalidArgumentError(
            f"{kind} {value!r} is not valid: use letters, digits, '.', '_' and '-', starting with a letter or digit."
        )
    return value


class Registry:
    """Named, versioned model releases in a directory.

    Args:
        root: the registry's directory (created when first written): a path or a
            URL (``file://``, ``memory://STORE/KEY``), as :func:`torchkeep.load` takes.
        storage: keep it in this storage instead, with ``root`` as the folder key.

    Example:
        >>> registry = torchkeep.Registry("model-registry")
        >>> v = registry.register("classifier", model, metadata={"accuracy": 0.93}, aliases=["staging"])
        >>> registry.set_alias("classifier", "production", v.version)
        >>> registry.load_into(model, "classifier", "production")
    """

    def __init__(self, root: str | os.PathLike[str], *, storage: Storage | None = None) -> None:
        self._storage, self._prefix = resolve(root, storage)
        self.root = self._storage.describe(self._prefix)
        local = self._storage.local_path(self._prefix)
        self._index_path = os.path.join(local, "index.sqlite") if local is not None else ":memory:"
        self._memory_db: sqlite3.Connection | None = None
        if self._index_path == ":memory:" or not os.path.exists(self._index_path):
            self.rebuild_index()  # an index held in memory starts empty: fill it from the files

    # -- keys and locking -----------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self._prefix, *parts) if p)

    def _version_key(self, name: str, version: int) -> str:
        return self._key("models", name, f"v{version}")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = FolderLock(self._storage, self._prefix, name=".registry.lock", blocking=True)
        try:
            yield
        finally:
            lock.release()

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        if self._index_path == ":memory:":
            if self._memory_db is None:
                self._memory_db = sqlite3.connect(":memory:", check_same_thread=False)
                self._memory_db.executescript(_SCHEMA)
            yield self._memory_db
            self._memory_db.commit()
            return
        os.makedirs(os.path.dirname(self._index_path), exist_ok=True)
        conn = sqlite3.connect(self._index_path, timeout=60)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            with conn:
                yield conn
        finally:
            conn.close()

    # -- files: the source of truth -------------------------------------------------------

    def _file_versions(self, name: str) -> list[int]:
        return sorted(
            int(m.group(1)) for n in self._storage.list(self._key("models", name)) if (m := _VERSION_DIR.match(n))
        )

    def _read_version(self, name: str, version: int) -> ModelVersion:
        key = self._version_key(name, version)
        record = read_manifest(self._storage, key).metadata.get("registry", {})
        return ModelVersion(
            name=name,
            version=version,
            path=self._storage.describe(key),
            created=str(record.get("created", "")),
            metadata=dict(record.get("metadata", {})),
            tags=tuple(record.get("tags", ())),
            description=record.get("description"),
            lineage=dict(record.get("lineage", {})),
        )

    def _file_aliases(self, name: str) -> dict[str, int]:
        aliases = {}
        folder = self._key("models", name, "aliases")
        for alias in self._storage.list(folder):
            with contextlib.suppress(TorchkeepError, ValueError, KeyError, TypeError):
                aliases[alias] = int(json.loads(self._storage.read(f"{folder}/{alias}"))["version"])
        return aliases

    def _index_model(self, conn: sqlite3.Connection, name: str) -> None:
        """Make the index agree with the files for one model."""
        conn.execute("DELETE FROM versions WHERE name = ?", (name,))
        conn.execute("DELETE FROM aliases WHERE name = ?", (name,))
        for version in self._file_versions(name):
            try:
                v = self._read_version(name, version)
            except TorchkeepError:
                continue  # a damaged version stays out of the index; verify() names it
            conn.execute(
                "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (name, version, v.path, v.created, v.description, json.dumps(list(v.tags)),
                 json.dumps(v.metadata), json.dumps(v.lineage)),
            )  # fmt: skip
        for alias, version in self._file_aliases(name).items():
            conn.execute("INSERT INTO aliases VALUES (?, ?, ?)", (name, alias, version))

    def rebuild_index(self) -> None:
        """Rebuild the whole SQLite index from the files (done automatically when it is missing)."""
        with self._locked(), self._db() as conn:
            conn.execute("DELETE FROM versions")
            conn.execute("DELETE FROM aliases")
            for name in self._storage.list(self._key("models")):
                if _NAME.match(name):
                    self._index_model(conn, name)

    # -- writing --------------------------------------------------------------------------

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
        """
        _check_name("Model name", name)
        meta = check_metadata(metadata)
        for alias in aliases:
            self._check_alias(alias)
        state, lineage = self._gather(source)
        with self._locked():
            version = max(self._file_versions(name), default=0) + 1
            key = self._version_key(name, version)
            record = {
                "name": name,
                "version": version,
                "created": utc_now(),
                "metadata": meta,
                "tags": list(tags or ()),
                "description": description,
                "lineage": lineage,
            }
            save(state, key, metadata={"registry": record}, storage=self._storage)
            verify(key, storage=self._storage)  # the stored bytes are exactly what was meant
            for alias in aliases:
                self._write_alias(name, alias, version)
            with self._db() as conn:
                self._index_model(conn, name)
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
        self._check_alias(alias)
        with self._locked():
            if version not in self._file_versions(name):
                raise CheckpointNotFoundError(f"{name!r} has no version {version}.", path=self.root)
            self._write_alias(name, alias, version)
            with self._db() as conn:
                self._index_model(conn, name)

    def remove_alias(self, name: str, alias: str) -> None:
        """Remove an alias; the version it pointed at stays."""
        with self._locked():
            self._storage.delete(self._key("models", name, "aliases", alias))
            with self._db() as conn:
                self._index_model(conn, name)

    def delete(self, name: str, version: int, *, force: bool = False) -> None:
        """Delete a version. Refused while an alias points at it, unless ``force`` (which removes those aliases)."""
        with self._locked():
            if version not in self._file_versions(name):
                raise CheckpointNotFoundError(f"{name!r} has no version {version}.", path=self.root)
            pointing = sorted(a for a, v in self._file_aliases(name).items() if v == version)
            if pointing and not force:
                raise InvalidArgumentError(
                    f"{name} v{version} is what {pointing} point at; move or remove them first, or pass force=True."
                )
            for alias in pointing:
                self._storage.delete(self._key("models", name, "aliases", alias))
            self._storage.delete(self._version_key(name, version))
            with self._db() as conn:
                self._index_model(conn, name)

    # -- reading --------------------------------------------------------------------------

    def models(self) -> list[str]:
        """Every model name with at least one version, sorted."""
        with self._db() as conn:
            return [row[0] for row in conn.execute("SELECT DISTINCT name FROM versions ORDER BY name")]

    def _row(self, conn: sqlite3.Connection, row: tuple[Any, ...]) -> ModelVersion:
        name, version, path, created, description, tags, metadata, lineage = row
        aliases = tuple(a for (a,) in conn.execute(
            "SELECT alias FROM aliases WHERE name = ? AND version = ? ORDER BY alias", (name, version)))  # fmt: skip
        return ModelVersion(name, version, path, created, json.loads(metadata), tuple(json.loads(tags)),
                            description, json.loads(lineage), aliases)  # fmt: skip

    def versions(self, name: str) -> list[ModelVersion]:
        """Every version of ``name``, oldest first."""
        with self._db() as conn:
            rows = conn.execute("SELECT * FROM versions WHERE name = ? ORDER BY version", (name,)).fetchall()
            return [self._row(conn, row) for row in rows]

    def _resolve(self, conn: sqlite3.Connection, name: str, version: int | str | None) -> int:
        if version is None or version == "latest":
            row = conn.execute("SELECT MAX(version) FROM versions WHERE name = ?", (name,)).fetchone()
            if row[0] is None:
                raise CheckpointNotFoundError(f"The registry {self.root!r} has no model {name!r}.", path=self.root)
            return int(row[0])
        if isinstance(version, int) and not isinstance(version, bool):
            return version
        if isinstance(version, str):
            row = conn.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, version)).fetchone()
            if row is None:
                raise CheckpointNotFoundError(f"{name!r} has no alias {version!r}.", path=self.root)
            return int(row[0])
        raise InvalidArgumentError(f"version must be an int, an alias or None, not {version!r}.")

    def get(self, name: str, version: int | str | None = None) -> ModelVersion:
        """The record of a version (an int), an alias (``"production"``), or the latest (None)."""
        with self._db() as conn:
            number = self._resolve(conn, name, version)
            row = conn.execute("SELECT * FROM versions WHERE name = ? AND version = ?", (name, number)).fetchone()
            if row is None:
                raise CheckpointNotFoundError(f"{name!r} has no version {number}.", path=self.root)
            return self._row(conn, row)

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
                equality test, a ``(operator, value)`` pair one of ``= != < <= > >=``.
            order_by: a metadata field; versions without it come last.
            descending: largest first (default).
            limit: at most this many.
        """
        clauses: list[str] = []
        params: list[Any] = []
        if name is not None:
            clauses.append("name = ?")
            params.append(name)
        for field_name, condition in (where or {}).items():
            op, value = condition if isinstance(condition, tuple) else ("=", condition)
            if op not in _OPERATORS:
                raise InvalidArgumentError(
                    f"Unknown operator {op!r} for {field_name!r}; use one of {list(_OPERATORS)}."
                )
            clauses.append(f"json_extract(metadata, ?) {_OPERATORS[op]} ?")
            params += [_json_path(field_name), value]
        sql = "SELECT * FROM versions" + (" WHERE " + " AND ".join(clauses) if clauses else "")
        if order_by is not None:
            direction = "DESC" if descending else "ASC"
            sql += f" ORDER BY json_extract(metadata, ?) IS NULL, json_extract(metadata, ?) {direction}"
            params += [_json_path(order_by), _json_path(order_by)]
        else:
            sql += " ORDER BY name, version"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        with self._db() as conn:
            return [self._row(conn, row) for row in conn.execute(sql, params).fetchall()]

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


def _json_path(field_name: str) -> str:
    return "$." + json.dumps(field_name)
