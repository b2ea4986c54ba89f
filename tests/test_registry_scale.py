"""The registry with many versions: correct answers at 1,000 versions, O(1) work per registration, and
search from the index agreeing with a brute-force scan.

Each test names the guard in ``torchkeep/registry.py`` it depends on; disabling that guard makes it fail.
The 1,000 versions are written as ``register`` writes them (the same checkpoint and registry record),
saved into memory and copied out without an fsync each, which takes about a second instead of a minute.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep
import torchkeep.registry as registry_module
from tests.registry_data import write_versions
from torchkeep import CorruptCheckpointError, Registry

SIZE = 1000

# Values chosen where SQL and Python could disagree: ints beyond a float's precision, ints beyond its
# range, bools beside numbers, strings beside numbers, non-ASCII strings, lists, dicts, null, absent.
VALUES: list[Any] = [0.5, 2**53, 2**53 + 1, 2**70, -(2**70), 10**400, True, False, 1, 1.0, "a", "b", "é", "😀",
                     "", [1, 2], [1.0, 2], {"k": 1}, None, "ABSENT", 0.25, -3, 7.0]  # fmt: skip


def meta(version: int) -> dict[str, Any]:
    value = VALUES[version % len(VALUES)]
    out: dict[str, Any] = {"accuracy": (version * 7919 % SIZE) / SIZE, "dataset": f"d{version % 7}"}
    if value != "ABSENT":
        out["score"] = value
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry of model ``m`` with 1,000 versions (``prod`` -> v10) and model ``n`` with 3, and its index."""
    root = tmp_path_factory.mktemp("scale") / "reg"
    write_versions(root, "m", SIZE, meta)
    write_versions(root, "n", 3, meta)
    registry = Registry(root)  # builds the index from the files
    registry.set_alias("m", "prod", 10)
    return root


@pytest.fixture
def root(built: Path, tmp_path: Path) -> Path:
    """A private copy of the built registry (its index is current)."""
    copy = tmp_path / "reg"
    shutil.copytree(built, copy, symlinks=True)
    return copy


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Counts manifest reads and listings of each storage folder the registry makes."""
    seen: dict[str, Any] = {"manifests": 0, "listed": []}
    real_read = registry_module.read_manifest

    def read_manifest(*args: Any, **kwargs: Any) -> Any:
        seen["manifests"] += 1
        return real_read(*args, **kwargs)

    real_list = torchkeep.LocalStorage.list

    def listing(self: Any, prefix: str = "") -> list[str]:
        seen["listed"].append(prefix.rsplit("/", 2)[-2:])
        return real_list(self, prefix)

    monkeypatch.setattr(registry_module, "read_manifest", read_manifest)
    monkeypatch.setattr(torchkeep.LocalStorage, "list", listing)
    yield seen


def index_rows(root: Path) -> list[tuple[str, int]]:
    conn = sqlite3.connect(f"file:{root / 'index.sqlite'}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT name, version FROM versions ORDER BY name, version").fetchall()
    finally:
        conn.close()


def test_a_thousand_versions_answer_correctly(root: Path) -> None:
    """Guard: the index as a whole (sync, fields, resolve) at 1,000 versions."""
    registry = Registry(root)
    v = registry.register("m", {"w": torch.zeros(2)}, metadata={"accuracy": 2.0}, aliases=["staging"])
    assert v.version == SIZE + 1 and v.aliases == ("staging",)
    versions = registry.versions("m")
    assert [x.version for x in versions] == list(range(1, SIZE + 2))
    assert all(x.metadata == meta(x.version) for x in versions[:SIZE])
    assert registry.get("m").version == SIZE + 1 == registry.get("m", "latest").version
    assert registry.get("m", "prod").version == 10 and registry.get("m", 500).metadata == meta(500)
    assert registry.models() == ["m", "n"]
    best = max(range(1, SIZE + 1), key=lambda version: meta(version)["accuracy"])
    assert [x.version for x in registry.search("m", order_by="accuracy", limit=2)] == [SIZE + 1, best]
    assert torch.equal(registry.load("m", 500)["w"], torch.full((2,), 500.0))
    assert index_rows(root)[-4:] == [("m", SIZE + 1), ("n", 1), ("n", 2), ("n", 3)]


def test_register_does_constant_work_whatever_the_number_of_versions(root: Path, counts: dict[str, Any]) -> None:
    """Guard: register takes the next number from a current index (_next_version) and indexes only the
    version it added (_only_added, _sync_model's ``added``): one manifest read, no listing of the versions."""
    registry = Registry(root)
    registry.set_alias("m", "prod", 10)  # the copy has new inodes: this write brings the index up to date
    for expected in (SIZE + 1, SIZE + 2):
        counts["manifests"], counts["listed"] = 0, []
        assert registry.register("m", {"w": torch.ones(2)}).version == expected
        assert counts["manifests"] == 1  # the new version, read back into the index
        assert ["models", "m"] not in counts["listed"]  # the 1,000 versions are never listed by the registry
    assert index_rows(root)[SIZE - 1 : SIZE + 2] == [("m", SIZE), ("m", SIZE + 1), ("m", SIZE + 2)]
    shutil.rmtree(root / "models" / "m" / "v3")  # by hand: the index is behind, so the versions are listed
    counts["manifests"] = 0
    assert registry.register("m", {"w": torch.ones(2)}).version == SIZE + 3
    assert counts["manifests"] == 1  # still only the new one: the others' stamps are unchanged
    assert 3 not in [v.version for v in registry.versions("m")]


def test_a_folder_added_by_hand_during_a_registration_is_indexed(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard: _only_added (the folder's link count grew by one) — otherwise the listing decides."""
    registry = Registry(root)
    registry.set_alias("m", "prod", 10)  # the copy has new inodes: this write brings the index up to date
    real_save = registry_module.save

    def save_and_copy(state: Any, key: str, **kwargs: Any) -> Any:
        result = real_save(state, key, **kwargs)
        shutil.copytree(root / "models" / "m" / "v5", root / "models" / "m" / "v2000")  # by hand, meanwhile
        return result

    monkeypatch.setattr(registry_module, "save", save_and_copy)
    assert registry.register("m", {"w": torch.ones(2)}).version == SIZE + 1
    monkeypatch.setattr(registry_module, "save", real_save)
    rows = index_rows(root)
    assert ("m", SIZE + 1) in rows
    with pytest.warns(RuntimeWarning, match=r"v2000"):  # a copy of v5: its record names v5, so it is damaged
        assert [v.version for v in Registry(root).versions("m")][-1] == SIZE + 1
    assert registry.register("m", {"w": torch.ones(2)}).version == 2001


def test_a_version_damaged_in_place_is_noticed_among_a_thousand(root: Path) -> None:
    """Guard: _check_current compares each returned version's manifest stamp with the index."""
    (root / "models" / "m" / "v700" / "manifest.json").write_bytes(b"{")
    registry = Registry(root)
    with pytest.raises(CorruptCheckpointError, match="v700"):
        registry.get("m", 700)
    with pytest.warns(RuntimeWarning, match="v700"):
        assert 700 not in [v.version for v in registry.versions("m")]


def brute_force(registry: Registry, where: dict[str, Any], order_by: str | None, limit: int | None) -> list[Any]:
    """Search as it was done before the index answered it: every version, filtered and sorted in Python."""
    conditions = registry_module._parse_where(where)
    found = [v for name in registry.models() for v in registry.versions(name)
             if all(registry_module._matches(v.metadata, f, op, x) for f, op, x in conditions)]  # fmt: skip
    if order_by is not None:
        present = [v for v in found if v.metadata.get(order_by) is not None]
        present.sort(key=lambda v: registry_module._order_key(v.metadata[order_by]), reverse=True)
        found = present + [v for v in found if v.metadata.get(order_by) is None]
    return [(v.name, v.version) for v in (found if limit is None else found[:limit])]


QUERIES: list[tuple[dict[str, Any], str | None, int | None]] = [
    ({"accuracy": (">=", 0.99)}, None, None),
    ({"dataset": "d3", "accuracy": ("<", 0.05)}, None, None),
    ({"score": (">", 2**53)}, None, None),
    ({"score": ("<", -(2**69))}, None, None),
    ({"score": 2**53 + 1}, None, None),
    ({"score": ("<=", 2**53)}, "score", None),
    ({"score": 1}, None, None),
    ({"score": True}, None, None),
    ({"score": [1, 2]}, None, None),
    ({"score": {"k": 1}}, None, None),
    ({"score": None}, None, None),
    ({"score": ("!=", None)}, None, 20),
    ({"score": (">", "a")}, None, None),
    ({"score": ("<", "é")}, "score", None),
    ({"score": ("=", "😀")}, None, None),
    ({}, "score", 30),
    # descending: 129 lists and dicts, 216 strings, 44 of 10**400, 45 of 2**70, then the 90 where 2**53 and
    # 2**53 + 1 are one float: the limit cuts that group
    ({}, "score", 129 + 216 + 44 + 45 + 20),
    ({}, "score", None),
    ({}, "accuracy", 5),
    ({"dataset": ("!=", "d1")}, "accuracy", 7),
]


@pytest.mark.parametrize(("where", "order_by", "limit"), QUERIES, ids=[str(q) for q in QUERIES])
def test_search_from_the_index_agrees_with_brute_force(
    built: Path, where: dict[str, Any], order_by: str | None, limit: int | None
) -> None:
    """Guard: _candidates never drops a match (numbers as rounded floats, ``<``/``>`` asked as ``<=``/``>=``),
    and the SQL order with its tie handling gives what _order_key gives."""
    registry = Registry(built)
    got = [(v.name, v.version) for v in registry.search(where=where, order_by=order_by, limit=limit)]
    assert got == brute_force(registry, where, order_by, limit)


def test_search_examines_only_the_candidates(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard: search narrows with SQL (the fields index) and stops at the limit in SQL order, so Python
    looks at a few rows, not at every version."""
    registry = Registry(built)
    examined = {"matches": 0, "ordered": 0}
    real_matches, real_order_key = registry_module._matches, registry_module._order_key

    def matches(*args: Any) -> bool:
        examined["matches"] += 1
        return real_matches(*args)

    def order_key(value: Any) -> Any:
        examined["ordered"] += 1
        return real_order_key(value)

    monkeypatch.setattr(registry_module, "_matches", matches)
    monkeypatch.setattr(registry_module, "_order_key", order_key)
    assert len(registry.search(where={"accuracy": (">=", 0.995)})) == 5  # of m's 1,000 (n's 3 are lower)
    assert examined["matches"] <= 10
    assert len(registry.search(order_by="accuracy", limit=3)) == 3
    assert examined["ordered"] <= 10
