"""The registry under hostile conditions: read-only filesystems, full disks, hostile queries, damaged
indexes, damaged versions, bad names, and special files where the registry expects its own.

Each test names the guard in ``torchkeep/registry.py`` it depends on; disabling that guard makes it fail.

Read-only filesystems and full disks are simulated, since the tests run as root (chmod changes nothing)
and cannot mount: ``read_only`` makes every write under the registry fail with ``EROFS`` at the ``os``
level, and makes SQLite behave as it does on a real read-only mount (checked by hand on a read-only bind
mount): a normal connection fails with "unable to open database file" at its first statement, while an
``immutable=1`` connection reads. A full disk is SQLite's own ``max_page_count`` limit (a real
``SQLITE_FULL``); a disk without free inodes makes creating a file or folder fail with ``ENOSPC``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
import torchkeep.registry as registry_module
from torchkeep import CorruptCheckpointError, InvalidArgumentError, Registry, StorageError, TorchkeepError

# -- helpers --------------------------------------------------------------------------------------


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def populated(root: Path) -> Registry:
    """m v1 (prod), m v2 (staging), m v3; n v1."""
    registry = Registry(root)
    registry.register("m", net(0), metadata={"accuracy": 0.7, "dataset": "a"}, aliases=["prod"])
    registry.register("m", net(1), metadata={"accuracy": 0.9, "dataset": "b"}, aliases=["staging"])
    registry.register("m", net(2), metadata={"accuracy": 0.8, "dataset": "a"})
    registry.register("n", {"w": torch.ones(3)}, metadata={"accuracy": 0.5})
    return registry


def summary(registry: Registry) -> dict[str, Any]:
    """Everything the read API answers, in comparable form."""
    twin = net(9)
    report = registry.load_into(twin, "m", "prod")
    return {
        "models": registry.models(),
        "versions": registry.versions("m"),
        "get": [registry.get("m"), registry.get("m", 2), registry.get("m", "prod"), registry.get("m", "latest")],
        "search": registry.search(where={"accuracy": (">", 0.6)}, order_by="accuracy"),
        "load": registry.load("m", 2)["0.weight"].tolist(),
        "load_into": (report.ok, twin[0].weight.tolist()),
        "diff": str(registry.diff("m", 1, 2)),
    }


def tree(root: Path) -> dict[str, Any]:
    """Every entry under ``root`` with its kind and bytes, to show nothing changed."""
    out: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_file():
            out[rel] = ("file", path.read_bytes())
        else:
            out[rel] = ("other", path.stat().st_mode)
    return out


def db_path(database: Any, uri: bool) -> tuple[str, str]:
    """The file a sqlite3.connect call opens, and its URI query."""
    text = os.fspath(database)
    if uri and text.startswith("file:"):
        location, _, query = text[5:].partition("?")
        return urllib.parse.unquote(location), query
    return text, ""


class _Unopenable(sqlite3.Connection):
    """What SQLite gives on a read-only mount for a WAL database: every statement fails to open the file."""

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        raise sqlite3.OperationalError("unable to open database file")

    def executescript(self, *args: Any, **kwargs: Any) -> Any:
        raise sqlite3.OperationalError("unable to open database file")

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        raise sqlite3.OperationalError("unable to open database file")


def under(path: Any, root: Path) -> bool:
    try:
        text = os.fsdecode(path) if not isinstance(path, int) else ""
    except TypeError:
        return False
    return bool(text) and os.path.abspath(text).startswith(str(root))


@contextlib.contextmanager
def read_only(monkeypatch: pytest.MonkeyPatch, root: Path) -> Iterator[None]:
    """Make ``root`` behave as if on a read-only filesystem (see the module docstring)."""
    rofs = OSError(errno.EROFS, os.strerror(errno.EROFS))

    def refuse(fn: Callable[..., Any], nargs: int = 1) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if any(under(a, root) for a in args[:nargs]):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), args[0])
            return fn(*args, **kwargs)

        return wrapper

    real_open, real_connect = os.open, sqlite3.connect
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & writing and under(path, root):
            raise OSError(rofs.errno, rofs.strerror, path)
        return real_open(path, flags, *args, **kwargs)

    def connect(database: Any, *args: Any, uri: bool = False, **kwargs: Any) -> sqlite3.Connection:
        path, query = db_path(database, uri)
        if under(path, root) and "immutable=1" not in query:
            return real_connect(":memory:", factory=_Unopenable)
        return real_connect(database, *args, uri=uri, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(os, "open", os_open)
        for name in ("mkdir", "rmdir", "remove", "unlink"):
            m.setattr(os, name, refuse(getattr(os, name)))
        for name in ("rename", "replace"):
            m.setattr(os, name, refuse(getattr(os, name), nargs=2))
        m.setattr(sqlite3, "connect", connect)
        yield


def no_manifest_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the registry reads a version's manifest (the index should answer)."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the registry read a manifest although its index was current")

    monkeypatch.setattr(registry_module, "read_manifest", refuse)


def finishes(fn: Callable[[], Any], fifo: Path | None = None, seconds: float = 20.0) -> Any:
    """Run ``fn`` in a thread; fail if it blocks (on a FIFO), unblocking it so the test run can go on."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if fifo is not None:  # a writer's open and close releases a reader blocked on the FIFO
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(seconds)
        pytest.fail(f"blocked for {seconds}s (a FIFO was opened and read)")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def index_rows(root: Path) -> list[tuple[str, int]]:
    conn = sqlite3.connect(f"file:{root / 'index.sqlite'}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT name, version FROM versions ORDER BY name, version").fetchall()
    finally:
        conn.close()


# -- 1. read-only filesystems ---------------------------------------------------------------------


def test_read_only_registry_reads_through_its_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard: _disk_index_for_reading opens the index immutable when a normal connection cannot open it."""
    populated(tmp_path)
    before, files = summary(Registry(tmp_path)), tree(tmp_path)
    with read_only(monkeypatch, tmp_path):
        no_manifest_reads(monkeypatch)  # the index answers: no fallback to reading every manifest
        assert summary(Registry(tmp_path)) == before
    assert tree(tmp_path) == files


@pytest.mark.parametrize("index", ["missing", "behind the files"])
def test_read_only_registry_without_a_current_index_reads_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, index: str
) -> None:
    """Guard: Registry() tolerates an index it cannot create, and _query answers from the files."""
    registry = Registry(tmp_path)
    registry.register("m", net(0), metadata={"accuracy": 0.7, "dataset": "a"}, aliases=["prod"])
    old_index = (tmp_path / "index.sqlite").read_bytes()
    populated_rest = [
        ("m", net(1), {"accuracy": 0.9, "dataset": "b"}, ["staging"]),
        ("m", net(2), {"accuracy": 0.8, "dataset": "a"}, []),
        ("n", {"w": torch.ones(3)}, {"accuracy": 0.5}, []),
    ]
    for name, source, meta, aliases in populated_rest:
        registry.register(name, source, metadata=meta, aliases=aliases)
    before = summary(registry)
    if index == "missing":
        (tmp_path / "index.sqlite").unlink()
    else:
        (tmp_path / "index.sqlite").write_bytes(old_index)  # knows only m v1
    files = tree(tmp_path)
    with read_only(monkeypatch, tmp_path):
        assert summary(Registry(tmp_path)) == before
    assert tree(tmp_path) == files


def test_read_only_registry_refuses_every_write_with_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guard: _locked turns the lock's OSError(EROFS) into a StorageError (FolderLock now does too)."""
    populated(tmp_path)
    files = tree(tmp_path)
    with read_only(monkeypatch, tmp_path):
        registry = Registry(tmp_path)
        writes: list[Callable[[], Any]] = [
            lambda: registry.register("m", net(5), aliases=["x"]),
            lambda: registry.set_alias("m", "prod", 2),
            lambda: registry.remove_alias("m", "prod"),
            lambda: registry.delete("m", 3),
            registry.rebuild_index,
        ]
        for write in writes:
            with pytest.raises(StorageError) as info:
                write()
            assert type(info.value) is StorageError
            assert str(tmp_path) in str(info.value) and "read-only" in str(info.value)
            assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.EROFS
        assert [v.version for v in registry.versions("m")] == [1, 2, 3]
    assert tree(tmp_path) == files


def test_index_that_refuses_writes_after_the_files_are_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard: register wraps an index failure after the commit ("attempt to write a readonly database")
    in a StorageError that names the stored version."""
    registry = Registry(tmp_path)
    registry.register("m", net(0))
    real_connect = sqlite3.connect
    index = str(tmp_path / "index.sqlite")

    def connect(database: Any, *args: Any, uri: bool = False, **kwargs: Any) -> sqlite3.Connection:
        path, _ = db_path(database, uri)
        if path == index:  # the index file can be read but not written: SQLite's own refusal
            return real_connect(f"file:{urllib.parse.quote(index)}?mode=ro", *args, uri=True, **kwargs)
        return real_connect(database, *args, uri=uri, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)
    with pytest.raises(StorageError, match=r"m v2 was stored") as info:
        registry.register("m", net(1))
    assert info.value.key == "m/v2" and "readonly database" in str(info.value)
    assert isinstance(info.value.__cause__, sqlite3.Error)
    assert [v.version for v in registry.versions("m")] == [1, 2]  # the files are the truth
    monkeypatch.setattr(sqlite3, "connect", real_connect)
    registry.set_alias("m", "prod", 2)  # the next write heals the index
    assert index_rows(tmp_path) == [("m", 1), ("m", 2)]


# -- 2. full disks --------------------------------------------------------------------------------


def test_disk_full_between_the_files_and_the_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard: register turns the index's SQLITE_FULL after the commit into a StorageError saying vN was
    stored and that the index heals later, with .key "NAME/vN"."""
    registry = Registry(tmp_path)
    registry.register("m", net(0), metadata={"accuracy": 0.5})
    real_connect = sqlite3.connect
    index = str(tmp_path / "index.sqlite")

    def connect(database: Any, *args: Any, uri: bool = False, **kwargs: Any) -> sqlite3.Connection:
        conn = real_connect(database, *args, uri=uri, **kwargs)
        if db_path(database, uri)[0] == index:  # the disk is full: the index cannot grow by a page
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages}")
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect)
    big = {"accuracy": 0.9, "notes": "x" * 50_000}
    with pytest.raises(StorageError) as info:
        registry.register("m", net(1), metadata=big)
    message = str(info.value)
    assert type(info.value) is StorageError and info.value.key == "m/v2"
    assert "m v2 was stored" in message and "rebuild_index()" in message and "would add v3" in message
    assert "full" in message and isinstance(info.value.__cause__, sqlite3.Error)
    torchkeep.verify(tmp_path / "models" / "m" / "v2")
    # Still full: reads see v2 from the files, so nobody registers it twice thinking it was lost.
    assert [v.version for v in registry.versions("m")] == [1, 2]
    assert registry.get("m").version == 2 and registry.get("m").metadata == big
    assert [v.version for v in registry.search("m", where={"accuracy": (">", 0.8)})] == [2]
    monkeypatch.setattr(sqlite3, "connect", real_connect)
    registry.set_alias("m", "prod", 1)  # space again: the next write heals the index
    assert index_rows(tmp_path) == [("m", 1), ("m", 2)]
    no_manifest_reads(monkeypatch)
    assert registry.get("m").version == 2 and registry.get("m", "prod").version == 1


def test_reads_see_versions_the_index_missed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard: _query compares the index's fingerprints with the files and answers a stale model from them."""
    registry = Registry(tmp_path)
    registry.register("m", net(0), aliases=["prod"])
    old_index = (tmp_path / "index.sqlite").read_bytes()
    registry.register("m", net(1), metadata={"accuracy": 0.9})
    registry.set_alias("m", "prod", 2)
    registry.register("k", {"w": torch.ones(1)})
    (tmp_path / "index.sqlite").write_bytes(old_index)  # a crash or full disk left the index behind
    fresh = Registry(tmp_path)
    assert [v.version for v in fresh.versions("m")] == [1, 2]
    assert fresh.get("m").version == 2 and fresh.get("m", "prod").version == 2
    assert fresh.models() == ["k", "m"]
    assert [(v.name, v.version) for v in fresh.search(where={"accuracy": 0.9})] == [("m", 2)]
    assert fresh.register("m", net(2)).version == 3  # not a second v2, and no silent duplicate
    assert index_rows(tmp_path) == [("k", 1), ("m", 1), ("m", 2), ("m", 3)]


def no_inodes(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Creating any new file or folder under ``root`` fails with ENOSPC; SQLite cannot create files either."""
    real_open, real_mkdir, real_connect = os.open, os.mkdir, sqlite3.connect

    def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_CREAT and under(path, root) and not os.path.lexists(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_open(path, flags, *args, **kwargs)

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if under(path, root):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real_mkdir(path, *args, **kwargs)

    def connect(database: Any, *args: Any, uri: bool = False, **kwargs: Any) -> sqlite3.Connection:
        path, _ = db_path(database, uri)
        if under(path, root) and not os.path.exists(path):
            return real_connect(":memory:", factory=_Unopenable)
        return real_connect(database, *args, uri=uri, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(sqlite3, "connect", connect)


def test_no_free_inode_for_the_lock_is_a_storage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard: _locked turns the lock's OSError(ENOSPC) into a StorageError (FolderLock now does too)."""
    existing = populated(tmp_path / "old")
    (tmp_path / "old" / ".registry.lock").unlink()
    no_inodes(monkeypatch, tmp_path)
    fresh = Registry(tmp_path / "new")  # cannot even create its folder: opens, reads as empty
    assert fresh.models() == []
    for write in (lambda: fresh.register("m", net(0)), lambda: existing.register("m", net(1))):
        with pytest.raises(StorageError, match=r"free inode") as info:
            write()
        assert str(tmp_path) in str(info.value)
        assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert [v.version for v in existing.versions("m")] == [1, 2, 3]
    assert not (tmp_path / "new").exists()


def test_no_free_inode_for_a_new_index_is_a_storage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard: rebuild_index wraps what it cannot create (SQLite's "unable to open", OSError) in StorageError."""
    registry = populated(tmp_path)
    no_inodes(monkeypatch, tmp_path)
    with pytest.raises(StorageError, match=r"index.*unable to open database file") as info:
        registry.rebuild_index()
    assert type(info.value) is StorageError
    assert [p.name for p in tmp_path.iterdir() if "rebuild" in p.name] == []
    assert registry.get("m").version == 3


# -- 3. queries -----------------------------------------------------------------------------------

ODD_KEYS = ['a"b', "a'b", "a\\b", "a.b", "$", "[0]", "", "a b", "ü", 'x"); DROP TABLE versions; --', "$.a", "*"]


def test_search_by_any_metadata_key(tmp_path: Path) -> None:
    """Guard: search filters in Python (_matches); no key is spliced into a SQLite JSON path."""
    registry = Registry(tmp_path)
    for i, key in enumerate(ODD_KEYS):
        registry.register("m", {"w": torch.ones(1)}, metadata={key: i, "other": i})
    for i, key in enumerate(ODD_KEYS):
        assert [v.version for v in registry.search(where={key: i})] == [i + 1], key
        assert [v.version for v in registry.search(where={key: (">=", 0)})] == [i + 1], key
        assert registry.search(order_by=key)[0].version == i + 1, key
    assert len(registry.versions("m")) == len(ODD_KEYS)


def test_search_by_null_list_dict_and_bool(tmp_path: Path) -> None:
    """Guard: _json_equal (JSON equality: null is a value, true is not 1, lists and dicts compare whole)."""
    registry = Registry(tmp_path)
    metas: list[dict[str, Any]] = [
        {"parent": None, "layers": [1, 2], "cfg": {"lr": 0.1}, "flag": True},
        {"parent": 1, "layers": [1, 2, 3], "cfg": {"lr": 0.2}, "flag": 1},
        {"layers": [True, 2], "flag": False},
    ]
    for meta in metas:
        registry.register("m", {"w": torch.ones(1)}, metadata=meta)

    def found(where: dict[str, Any]) -> list[int]:
        return [v.version for v in registry.search("m", where=where)]

    assert found({"parent": None}) == [1]  # null, and not a missing key
    assert found({"parent": ("!=", None)}) == [2]
    assert found({"layers": [1, 2]}) == [1] and found({"layers": [2, 1]}) == []
    assert found({"layers": ("=", [1, 2, 3])}) == [2] and found({"layers": ("!=", [1, 2])}) == [2, 3]
    assert found({"cfg": {"lr": 0.1}}) == [1] and found({"cfg": ("==", {"lr": 0.2})}) == [2]
    assert found({"flag": True}) == [1] and found({"flag": 1}) == [2] and found({"flag": False}) == [3]
    assert found({"layers": [1, 2], "flag": True}) == [1]


@pytest.mark.parametrize(
    ("where", "match"),
    [
        ({"accuracy": (">", None)}, r"'>' on 'accuracy' compares numbers or strings"),
        ({"accuracy": ("<", [1])}, r"'<' on 'accuracy' compares numbers or strings"),
        ({"accuracy": (">=", {"a": 1})}, r"'>=' on 'accuracy'"),
        ({"accuracy": ("<=", True)}, r"'<=' on 'accuracy'"),
        ({"accuracy": (">", 0.5, "extra")}, r"condition for 'accuracy'.*\(operator, value\) pair"),
        ({"accuracy": (1, 2)}, r"condition for 'accuracy'"),
        ({"accuracy": ()}, r"condition for 'accuracy'"),
        ({"accuracy": (["="], 1)}, r"condition for 'accuracy'"),
        ({"accuracy": ("~", 1)}, r"Unknown operator '~' for 'accuracy'"),
        ({"accuracy": ("LIKE", "%")}, r"Unknown operator 'LIKE'"),
        ({"accuracy": float("nan")}, r"value for 'accuracy'.*metadata cannot hold"),
        ({"accuracy": (">", float("inf"))}, r"value for 'accuracy'"),
        ({"accuracy": {1, 2}}, r"value for 'accuracy'"),
        ({"accuracy": object()}, r"value for 'accuracy'"),
        ({"accuracy": torch.ones(1)}, r"value for 'accuracy'"),
        ({3: 1}, r"search field 3 is not a string"),
        ([("accuracy", 1)], r"where must be a dict"),
        ("accuracy>1", r"where must be a dict"),
    ],
)
def test_malformed_search_conditions_are_refused(tmp_path: Path, where: Any, match: str) -> None:
    """Guard: _parse_where (condition shape, operator, JSON value, ordering needs a number or a string)."""
    registry = Registry(tmp_path)
    registry.register("m", {"w": torch.ones(1)}, metadata={"accuracy": 0.9})
    with pytest.raises(InvalidArgumentError, match=match):
        registry.search(where=where)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"limit": -1}, "limit"),
        ({"limit": True}, "limit"),
        ({"limit": "3"}, "limit"),
        ({"order_by": ["accuracy"]}, "order_by"),
        ({"name": "m\n"}, "Model name"),
    ],
)
def test_malformed_search_arguments_are_refused(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    """Guard: search's argument checks (limit, order_by, name)."""
    registry = Registry(tmp_path)
    registry.register("m", {"w": torch.ones(1)}, metadata={"accuracy": 0.9})
    with pytest.raises(InvalidArgumentError, match=match):
        registry.search(**kwargs)


def test_search_orders_mixed_and_missing_values(tmp_path: Path) -> None:
    """Guard: _order_key (numbers, then strings, then lists and dicts; missing or null always last)."""
    registry = Registry(tmp_path)
    for value in [2, "b", None, 10, "a", [1], 2.5, "MISSING"]:
        registry.register("m", {"w": torch.ones(1)}, metadata={} if value == "MISSING" else {"score": value})
    order = [v.version for v in registry.search("m", order_by="score", descending=False)]
    assert order == [1, 7, 4, 5, 2, 6, 3, 8]
    assert [v.version for v in registry.search("m", order_by="score")] == [6, 2, 5, 4, 7, 1, 3, 8]
    assert registry.search("m", order_by="score", limit=0) == []
    assert [v.version for v in registry.search("m", where={"score": (">", "a")})] == [2]  # strings with strings
    assert [v.version for v in registry.search("m", where={"score": (">", 2)})] == [4, 7]  # numbers with numbers


# -- 4. damaged index -----------------------------------------------------------------------------


def damage_index(root: Path, kind: str, victim: Path) -> None:
    index = root / "index.sqlite"
    raw = index.read_bytes()
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            (root / f"index.sqlite{suffix}").unlink()
    if kind == "random bytes":
        index.write_bytes(os.urandom(len(raw)))
    elif kind == "truncated":
        index.write_bytes(raw[: len(raw) // 2 + 100])
    elif kind == "empty":
        index.write_bytes(b"")
    elif kind == "text":
        index.write_text("this is not a database\n")
    elif kind == "header only":
        index.write_bytes(raw[:100] + bytes(len(raw) - 100))
    elif kind in ("wrong schema", "old version"):
        index.unlink()
        conn = sqlite3.connect(index)
        if kind == "wrong schema":
            conn.executescript(
                "CREATE TABLE versions (x INTEGER); INSERT INTO versions VALUES (1); PRAGMA user_version=2;"
            )
        else:
            conn.executescript(
                registry_module._SCHEMA.replace(f"user_version = {registry_module._SCHEMA_VERSION}", "user_version = 1")
            )
        conn.close()
    elif kind == "symlink to a file":
        index.unlink()
        index.symlink_to(victim)
    elif kind == "fifo":
        index.unlink()
        os.mkfifo(index)
    else:
        raise AssertionError(kind)


DAMAGE = ["random bytes", "truncated", "empty", "text", "header only", "wrong schema", "old version",
          "symlink to a file", "fifo"]  # fmt: skip


@pytest.mark.parametrize("kind", DAMAGE)
def test_rebuild_index_replaces_a_damaged_index(tmp_path: Path, kind: str) -> None:
    """Guard: _write_new_index writes a new index beside the old one and renames it into place."""
    root, victim = tmp_path / "reg", tmp_path / "victim.txt"
    victim.write_text("not the registry's")
    before = summary(populated(root))
    damage_index(root, kind, victim)
    registry = Registry(root)
    finishes(registry.rebuild_index, fifo=root / "index.sqlite")
    assert (root / "index.sqlite").is_file() and not (root / "index.sqlite").is_symlink()
    assert index_rows(root) == [("m", 1), ("m", 2), ("m", 3), ("n", 1)]
    assert summary(registry) == before
    assert victim.read_text() == "not the registry's"
    assert [p.name for p in root.iterdir() if "rebuild" in p.name] == []


@pytest.mark.parametrize("kind", DAMAGE)
def test_reads_on_a_damaged_index_rebuild_it_with_a_warning(tmp_path: Path, kind: str) -> None:
    """Guard: _disk_index_for_reading treats a damaged index (_Damaged) by rebuilding it, with a warning."""
    root, victim = tmp_path / "reg", tmp_path / "victim.txt"
    victim.write_text("not the registry's")
    before = summary(populated(root))
    damage_index(root, kind, victim)
    registry = Registry(root)
    with pytest.warns(RuntimeWarning, match=r"index.*damaged.*rebuilt from the files"):
        versions = finishes(lambda: registry.versions("m"), fifo=root / "index.sqlite")
    assert versions == before["versions"]
    assert index_rows(root) == [("m", 1), ("m", 2), ("m", 3), ("n", 1)]  # rebuilt on disk
    assert summary(registry) == before  # and no further warning: pytest turns warnings into errors
    assert victim.read_text() == "not the registry's"


def test_writes_on_a_damaged_index_rebuild_it(tmp_path: Path) -> None:
    """Guard: _open_for_write rebuilds a damaged index (with a warning) instead of failing the write."""
    registry = populated(tmp_path)
    (tmp_path / "index.sqlite").write_bytes(b"SQLite format 3\x00" + os.urandom(4000))
    with pytest.warns(RuntimeWarning, match="damaged"):
        assert registry.register("m", net(7)).version == 4
    assert index_rows(tmp_path)[-2:] == [("m", 4), ("n", 1)]


def test_damaged_index_on_a_read_only_filesystem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard: _rebuilt_after_damage falls back to the files, with a warning, when it cannot rebuild."""
    before = summary(populated(tmp_path))
    (tmp_path / "index.sqlite").write_bytes(os.urandom(8192))
    files = tree(tmp_path)
    with read_only(monkeypatch, tmp_path):
        registry = Registry(tmp_path)
        with pytest.warns(RuntimeWarning, match=r"damaged.*could not be rebuilt.*rebuild_index\(\)"):
            assert summary(registry) == before
    assert tree(tmp_path) == files


def test_a_rebuilt_index_never_replays_the_old_write_ahead_log(tmp_path: Path) -> None:
    """Guard: _write_new_index removes the old index's -wal and -shm before renaming the new index in."""
    registry = populated(tmp_path)
    index = tmp_path / "index.sqlite"
    held = sqlite3.connect(index)  # keeps the WAL from being checkpointed away
    held.execute("PRAGMA wal_autocheckpoint=0")
    with held:
        held.execute("UPDATE versions SET metadata = '{\"accuracy\": -1}', description = 'from the old WAL'")
    shutil.copy(str(index) + "-wal", tmp_path / "saved-wal")
    held.close()
    shutil.copy(tmp_path / "saved-wal", str(index) + "-wal")  # the old log is back beside the index
    registry.rebuild_index()
    assert [v.metadata["accuracy"] for v in registry.versions("m")] == [0.7, 0.9, 0.8]
    assert all(v.description is None for v in registry.versions("m"))


# -- 5. one damaged version -----------------------------------------------------------------------


def plant_v2(root: Path, kind: str, tmp_path: Path) -> None:
    """Replace m's v2 with a damaged one (the record built as register would, then spoiled)."""
    v2 = root / "models" / "m" / "v2"
    shutil.rmtree(v2)
    good = {"name": "m", "version": 2, "created": "2024-01-01T00:00:00Z", "metadata": {"accuracy": 0.95},
            "tags": [], "description": None, "lineage": {"source": "state_dict"}}  # fmt: skip
    spoiled: dict[str, Any] = {
        "no record": None,
        "record is a string": "v2",
        "metadata is a list": {**good, "metadata": [1]},
        "tags is a string": {**good, "tags": "abc"},
        "tags hold numbers": {**good, "tags": [1]},
        "version is a string": {**good, "version": "2"},
        "version is a bool": {**good, "version": True},
        "created is null": {**good, "created": None},
        "description is a number": {**good, "description": 5},
        "lineage is a list": {**good, "lineage": []},
        "no created": {k: v for k, v in good.items() if k != "created"},
        "copied from v1": {**good, "version": 1},
        "another model's": {**good, "name": "n"},
    }
    if kind in spoiled:
        meta = {} if spoiled[kind] is None else {"registry": spoiled[kind]}
        torchkeep.save({"w": torch.ones(1)}, v2, metadata=meta)
        return
    torchkeep.save({"w": torch.ones(1)}, v2, metadata={"registry": good})
    manifest = v2 / "manifest.json"
    if kind == "garbage manifest":
        manifest.write_bytes(os.urandom(300))
    elif kind == "truncated manifest":
        manifest.write_bytes(manifest.read_bytes()[:40])
    elif kind == "no manifest":
        manifest.unlink()
    elif kind == "manifest is a fifo":
        manifest.unlink()
        os.mkfifo(manifest)
    elif kind == "manifest is a directory":
        manifest.unlink()
        manifest.mkdir()
    elif kind == "manifest is a symlink":
        target = tmp_path / "elsewhere.json"
        shutil.move(str(manifest), target)
        manifest.symlink_to(target)
    elif kind == "version is a file":
        shutil.rmtree(v2)
        v2.write_text("{}")
    else:
        raise AssertionError(kind)


V2_DAMAGE = ["no record", "record is a string", "metadata is a list", "tags is a string", "tags hold numbers",
             "version is a string", "version is a bool", "created is null", "description is a number",
             "lineage is a list", "no created", "copied from v1", "another model's", "garbage manifest",
             "truncated manifest", "no manifest", "manifest is a fifo", "manifest is a directory",
             "manifest is a symlink", "version is a file"]  # fmt: skip


@pytest.mark.parametrize("kind", V2_DAMAGE)
def test_one_damaged_version_leaves_the_others_usable(tmp_path: Path, kind: str) -> None:
    """Guard: _read_version checks the record (_record_problem) and the manifest's kind; _index_model keeps a
    damaged version out as a problem that listings name in a warning and get() raises."""
    root = tmp_path / "reg"
    populated(root)
    plant_v2(root, kind, tmp_path)
    fifo = root / "models" / "m" / "v2" / "manifest.json"
    registry = Registry(root)
    with pytest.warns(RuntimeWarning, match=r"Skipping .*v2"):
        finishes(registry.rebuild_index, fifo=fifo)
    for listing in (lambda: registry.versions("m"), lambda: registry.search("m")):
        with pytest.warns(RuntimeWarning, match=r"Skipping .*v2") as seen:
            assert [v.version for v in finishes(listing, fifo=fifo)] == [1, 3]
        assert len(seen) == 1
    with pytest.warns(RuntimeWarning, match=r"v2"):
        assert registry.models() == ["m", "n"]
    assert registry.get("m").version == 3 and registry.get("m", "prod").version == 1
    assert torch.equal(registry.load("m", 3)["0.weight"], net(2)[0].weight)
    with pytest.raises(CorruptCheckpointError, match=r"v2") as info:
        registry.get("m", 2)
    assert info.value.key == "m/v2" and "v2" in str(info.value.path)
    with pytest.raises(CorruptCheckpointError, match="v2"):
        registry.set_alias("m", "prod", 2)
    assert registry.register("m", net(4)).version == 4  # the damaged number is never reused
    registry.delete("m", 2, force=True)  # and it can be cleaned up (staging pointed at it)
    assert [v.version for v in registry.versions("m")] == [1, 3, 4]


def test_a_model_with_only_damaged_versions(tmp_path: Path) -> None:
    """Guard: _resolve raises CorruptCheckpointError naming the damaged versions when none is usable."""
    root = tmp_path / "reg"
    registry = Registry(root)
    registry.register("m", {"w": torch.ones(1)})
    (root / "models" / "m" / "v1" / "manifest.json").write_bytes(b"{")
    with pytest.warns(RuntimeWarning, match="v1"):
        assert registry.models() == []
    with pytest.raises(CorruptCheckpointError, match=r"no usable version: v1"):
        registry.get("m")


# -- 6. names -------------------------------------------------------------------------------------

BAD_NAMES = ["m\n", "m\r", "m\r\n", "\nm", "m\x00", "m\t", "a/b", "..", ".", "../m", "/m", "m/", "", " m",
             "m ", "x" * 129, "\uff4d", "m\u0430", "\u200bm", "m\u0301", "-m", ".m", "m:1", "m\\x", 5, None,
             b"m"]  # fmt: skip


@pytest.mark.parametrize("bad", BAD_NAMES, ids=[repr(n) for n in BAD_NAMES])
def test_bad_names_and_aliases_are_refused(tmp_path: Path, bad: Any) -> None:
    """Guard: _check_name uses re.fullmatch (``$`` would let a trailing newline through)."""
    registry = Registry(tmp_path)
    registry.register("m", {"w": torch.ones(1)})
    calls: list[Callable[[], Any]] = [
        lambda: registry.register(bad, {"w": torch.ones(1)}),
        lambda: registry.register("m", {"w": torch.ones(1)}, aliases=[bad]),
        lambda: registry.set_alias("m", bad, 1),
        lambda: registry.set_alias(bad, "prod", 1),
        lambda: registry.remove_alias("m", bad),
        lambda: registry.delete(bad, 1),
        lambda: registry.versions(bad),
        lambda: registry.get(bad),
    ]
    if bad is not None:  # search(None) searches every model
        calls.append(lambda: registry.search(bad))
    if isinstance(bad, str):
        calls.append(lambda: registry.get("m", bad))
    for call in calls:
        with pytest.raises(InvalidArgumentError, match="not valid"):
            call()
    assert sorted(os.listdir(tmp_path / "models")) == ["m"]
    assert sorted(os.listdir(tmp_path / "models" / "m")) == ["v1"]


def test_good_edge_names(tmp_path: Path) -> None:
    """Guard: _check_name still accepts every name the pattern allows."""
    registry = Registry(tmp_path)
    for name in ("x" * 128, "A.b-c_1", "1", "m..n"):
        registry.register(name, {"w": torch.ones(1)}, aliases=["a" * 128, "x.y"])
        assert registry.get(name, "x.y").version == 1


def test_folders_that_only_look_like_versions_are_ignored(tmp_path: Path) -> None:
    """Guard: _VERSION_DIR is an ASCII, whole-name pattern without leading zeros."""
    registry = Registry(tmp_path)
    registry.register("m", {"w": torch.ones(1)}, aliases=["prod"])
    v1 = tmp_path / "models" / "m" / "v1"
    for fake in ("v007", "v01", "v0", "v1\n", "v\u0661", "v\uff12", "v-1", "v 3", "V4"):
        shutil.copytree(v1, v1.parent / fake)
    (v1.parent / "aliases" / "prod\n").write_text('{"version": 1}')
    registry.rebuild_index()
    assert [v.version for v in registry.versions("m")] == [1]
    assert registry.register("m", {"w": torch.zeros(1)}).version == 2
    assert [v.version for v in registry.versions("m")] == [1, 2]
    assert registry.get("m", 1).aliases == ("prod",)


# -- 7. special files where the registry expects its own -----------------------------------------


def plant_alias(aliases: Path, kind: str, tmp_path: Path) -> None:
    alias = aliases / "prod"
    alias.unlink()
    outside = tmp_path / "outside.json"
    outside.write_text('{"version": 1}')
    if kind == "fifo":
        os.mkfifo(alias)
    elif kind == "directory":
        alias.mkdir()
        (alias / "version").write_text("1")
    elif kind == "symlink to a file":
        alias.symlink_to(outside)
    elif kind == "symlink to a fifo":
        os.mkfifo(tmp_path / "fifo")
        alias.symlink_to(tmp_path / "fifo")
    elif kind == "dangling symlink":
        alias.symlink_to(tmp_path / "nowhere")
    elif kind == "huge file":
        alias.write_text('{"version": 1, "pad": "' + "x" * 100_000 + '"}')
    elif kind == "not json":
        alias.write_bytes(b"\xff\xfe{version")
    elif kind == "version is a string":
        alias.write_text('{"version": "1"}')
    elif kind == "version is a bool":
        alias.write_text('{"version": true}')
    elif kind == "version is zero":
        alias.write_text('{"version": 0}')
    elif kind == "a list":
        alias.write_text("[1]")
    else:
        raise AssertionError(kind)


ALIAS_KINDS = ["fifo", "directory", "symlink to a file", "symlink to a fifo", "dangling symlink", "huge file",
               "not json", "version is a string", "version is a bool", "version is zero", "a list"]  # fmt: skip


@pytest.mark.parametrize("kind", ALIAS_KINDS)
def test_an_alias_that_is_not_a_small_regular_file(tmp_path: Path, kind: str) -> None:
    """Guard: _read_alias (lstat is S_ISREG, O_NONBLOCK|O_NOFOLLOW, fstat, a size cap, {"version": N})."""
    root = tmp_path / "reg"
    populated(root)
    aliases = root / "models" / "m" / "aliases"
    plant_alias(aliases, kind, tmp_path)
    fifo = aliases / "prod" if kind == "fifo" else tmp_path / "fifo"
    outside = (tmp_path / "outside.json").read_bytes()
    registry = Registry(root)
    with pytest.warns(RuntimeWarning, match=r"Skipping .*aliases/prod"):
        finishes(registry.rebuild_index, fifo=fifo)
    with pytest.warns(RuntimeWarning, match=r"Skipping .*aliases/prod"):
        assert [v.aliases for v in finishes(lambda: registry.versions("m"), fifo=fifo)] == [(), ("staging",), ()]
    with pytest.raises(CorruptCheckpointError, match=r"aliases/prod.*(regular file|symbolic link|not usable)"):
        registry.get("m", "prod")
    assert registry.get("m", "staging").version == 2
    assert finishes(lambda: registry.register("m", net(5)), fifo=fifo).version == 4  # holds the lock: no hang
    registry.set_alias("m", "prod", 4)  # replaces the planted entry itself, never what a link points at
    assert registry.get("m", "prod").version == 4 and (aliases / "prod").is_file()
    assert not (aliases / "prod").is_symlink()
    assert (tmp_path / "outside.json").read_bytes() == outside


def test_removing_a_planted_fifo_alias(tmp_path: Path) -> None:
    """Guard: _read_alias refuses the FIFO (listings warn instead of blocking); remove_alias deletes it."""
    registry = populated(tmp_path)
    fifo = tmp_path / "models" / "m" / "aliases" / "prod"
    fifo.unlink()
    os.mkfifo(fifo)
    with pytest.warns(RuntimeWarning, match=r"aliases/prod.*FIFO"):
        finishes(lambda: registry.versions("m"), fifo=fifo)
    finishes(lambda: registry.remove_alias("m", "prod"), fifo=fifo)
    assert not fifo.exists() and registry.get("m", 1).aliases == ()  # and no more warnings


@pytest.mark.parametrize("kind", ["symlink", "hard link"])
def test_a_planted_lock_file_is_not_written_through(tmp_path: Path, kind: str) -> None:
    """Guard: FolderLock (locking.py, another engineer's fix) opens the lock with O_NOFOLLOW and refuses links."""
    root = tmp_path / "reg"
    registry = Registry(root)
    registry.register("m", {"w": torch.ones(1)})
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    lock = root / ".registry.lock"
    lock.unlink()
    if kind == "symlink":
        lock.symlink_to(victim)
    else:
        os.link(victim, lock)
    with contextlib.suppress(TorchkeepError):  # refusing is fine; writing through the link is not
        registry.register("m", {"w": torch.zeros(1)})
    assert victim.read_text() == "precious\n"


def test_a_lock_file_that_is_a_fifo(tmp_path: Path) -> None:
    """Guard: FolderLock (locking.py) refuses a lock file that is not a regular file, without blocking."""
    registry = Registry(tmp_path)
    lock = tmp_path / ".registry.lock"
    lock.unlink()
    os.mkfifo(lock)
    with pytest.raises(StorageError, match=r"\.registry\.lock"):
        finishes(lambda: registry.register("m", {"w": torch.ones(1)}), fifo=lock)


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm"])
def test_index_files_planted_as_links_are_not_written_through(tmp_path: Path, suffix: str) -> None:
    """Guard: _open_for_write rebuilds (replacing the links) when the index, its -wal or -shm is not a
    regular file, and _disk_index_for_reading then reads immutable."""
    other = Registry(tmp_path / "other")  # the victim: another registry's index, a valid database
    other.register("x", {"w": torch.ones(1)})
    victim = tmp_path / "other" / f"index.sqlite{suffix}"
    if suffix:
        victim.write_bytes(b"")
    original = victim.read_bytes()
    root = tmp_path / "reg"
    registry = populated(root)
    link = root / f"index.sqlite{suffix}"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to(victim)
    with pytest.warns(RuntimeWarning, match="symbolic link") if not suffix else contextlib.nullcontext():
        registry.versions("m")  # the index itself a link: rebuilt; the -wal or -shm a link: read immutable
    registry.register("m", net(5), metadata={"big": "x" * 20_000})
    registry.versions("m")
    assert victim.read_bytes() == original
    assert [v.version for v in Registry(tmp_path / "other").versions("x")] == [1]


def test_registry_reads_and_writes_with_nothing_hostile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard: the fingerprint check lets a current index answer without reading any manifest."""
    registry = populated(tmp_path)
    no_manifest_reads(monkeypatch)
    assert [v.version for v in registry.versions("m")] == [1, 2, 3]
    assert registry.get("m", "staging").version == 2 and registry.models() == ["m", "n"]


def test_a_tuple_inside_a_list_value_matches_a_list(tmp_path: Path) -> None:
    """Guard: _json_value turns tuples into lists, so a tuple nested in a list value matches like a list."""
    registry = Registry(tmp_path)
    registry.register("m", {"w": torch.ones(1)}, metadata={"pairs": [[1, 2]]})
    assert [v.version for v in registry.search(where={"pairs": [(1, 2)]})] == [1]
    assert json.loads(json.dumps(registry.get("m").metadata)) == {"pairs": [[1, 2]]}


@pytest.mark.parametrize("version", [True, False, 0, -1, 1.0, "1", None])
def test_bad_version_arguments_are_refused(tmp_path: Path, version: Any) -> None:
    """Guard: _check_version (set_alias, delete) and get's type check; True is not version 1."""
    registry = Registry(tmp_path)
    registry.register("m", {"w": torch.ones(1)})
    for call in (lambda: registry.set_alias("m", "prod", version), lambda: registry.delete("m", version)):
        with pytest.raises(InvalidArgumentError, match="version"):
            call()
    if isinstance(version, (bool, float)):  # get takes an int, an alias or None
        with pytest.raises(InvalidArgumentError, match="version"):
            registry.get("m", version)
    assert not (tmp_path / "models" / "m" / "aliases").exists() and registry.versions("m")[0].version == 1


def test_a_moved_registry_names_its_own_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard: _row gives each version's path as this registry sees it, not as the index recorded it
    (a registry moved with its index, or read through another mount point)."""
    populated(tmp_path / "a")
    os.rename(tmp_path / "a", tmp_path / "b")
    moved = Registry(tmp_path / "b")
    no_manifest_reads(monkeypatch)  # the index is current: it answers
    assert all(v.path.startswith(str(tmp_path / "b")) for v in moved.versions("m"))
    assert torch.equal(torchkeep.load(moved.get("m", "prod").path)["0.weight"], net(0)[0].weight)


def test_two_registries_on_one_memory_store_see_each_other() -> None:
    """Guard: the private in-memory index is brought up to date from the files on every read."""
    storage = torchkeep.MemoryStorage()
    first, second = Registry("reg", storage=storage), Registry("reg", storage=storage)
    assert first.models() == [] and second.models() == []
    first.register("m", {"w": torch.ones(1)}, aliases=["prod"])
    second.register("m", {"w": torch.zeros(1)})
    first.set_alias("m", "prod", 2)
    assert [v.version for v in first.versions("m")] == [1, 2] == [v.version for v in second.versions("m")]
    assert second.get("m", "prod").version == 2


def test_a_damaged_alias_in_a_memory_store() -> None:
    """Guard: _read_alias checks size and content on storages without a local path too."""
    storage = torchkeep.MemoryStorage()
    registry = Registry("reg", storage=storage)
    registry.register("m", {"w": torch.ones(1)}, aliases=["prod", "big"])
    for alias, data in (("prod", b"{not json"), ("big", b'{"version": 1, "pad": "' + b"x" * 10_000 + b'"}')):
        with storage.begin(f"reg/models/m/aliases/{alias}", directory=False) as txn, txn.open() as f:
            f.write(data)
    with pytest.warns(RuntimeWarning, match=r"aliases/(big|prod)") as seen:
        assert registry.versions("m")[0].aliases == ()
    assert len(seen) == 2 and "aliases/big" in str(seen[0].message) and "aliases/prod" in str(seen[1].message)
    for alias in ("prod", "big"):
        with pytest.raises(CorruptCheckpointError, match=f"aliases/{alias}"):
            registry.get("m", alias)


def test_register_refuses_a_record_it_could_not_read_back(tmp_path: Path) -> None:
    """Guard: register checks tags and description, which _record_problem would later call damaged."""
    registry = Registry(tmp_path)
    for kwargs in ({"tags": [1]}, {"tags": "abc"}, {"description": 5}):
        with pytest.raises(InvalidArgumentError, match=r"tags|description"):
            registry.register("m", {"w": torch.ones(1)}, **kwargs)
    assert not (tmp_path / "models" / "m").exists()


OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL, version INTEGER NOT NULL, path TEXT NOT NULL, created TEXT NOT NULL,
    description TEXT, tags TEXT NOT NULL, metadata TEXT NOT NULL, lineage TEXT NOT NULL,
    PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (name, alias));
"""


@pytest.mark.parametrize("first", ["read", "write"])
def test_an_index_from_an_earlier_torchkeep_is_replaced_quietly(tmp_path: Path, first: str) -> None:
    """Guard: _open_index tells an earlier torchkeep's index (_Outdated) from a damaged one: no warning."""
    registry = populated(tmp_path)
    before = summary(registry)
    (tmp_path / "index.sqlite").unlink()
    conn = sqlite3.connect(tmp_path / "index.sqlite")
    conn.executescript(OLD_SCHEMA)
    conn.execute("INSERT INTO versions VALUES ('m', 1, 'x', 'c', NULL, '[]', '{}', '{}')")
    conn.commit()
    conn.close()
    upgraded = Registry(tmp_path)  # pytest turns any warning into an error
    if first == "write":
        upgraded.set_alias("m", "prod", 1)
    assert summary(upgraded) == before
    assert index_rows(tmp_path) == [("m", 1), ("m", 2), ("m", 3), ("n", 1)]
