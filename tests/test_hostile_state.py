"""What save accepts, load reads back: names, sizes, views, objects and options an outsider would try."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import torchkeep
from torchkeep.manifest import MAX_MANIFEST_BYTES
from torchkeep.tree import MAX_TEXT_BYTES

from .conftest import assert_same

SUFFIXES = ["", ".safetensors"]


# -- names that the file layer reserves or refuses ---------------------------------------------

ODD_KEYS = ["__metadata__", "a\x00b", "\x00", "s\ud800", "\udfff", "__metadata__#1", "üñï", "a/b", ""]


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("nested", [False, True])
def test_every_key_save_accepts_loads_back(tmp_path: Path, suffix: str, nested: bool) -> None:
    leaves = {key: torch.full((2,), float(i)) for i, key in enumerate(ODD_KEYS)}
    state: dict[str, Any] = {"inner": leaves} if nested else leaves
    torchkeep.save(state, tmp_path / f"ckpt{suffix}")
    assert_same(torchkeep.load(tmp_path / f"ckpt{suffix}"), state)
    assert torchkeep.verify(tmp_path / f"ckpt{suffix}").tensors == len(ODD_KEYS)


def test_odd_keys_in_a_manager_leave_retention_working(tmp_path: Path) -> None:
    with torchkeep.CheckpointManager(tmp_path, keep_last=1) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, state={"__metadata__": torch.ones(1) * step, "x\x00": torch.zeros(1)})
        assert [r.step for r in mgr.list()] == [3]
        state: dict[str, Any] = {}
        assert mgr.restore(state=state) is not None
        assert state["__metadata__"].item() == 3.0


# -- sizes past what readers accept ------------------------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("kind", ["bytes", "str", "many small"])
def test_values_too_large_for_a_manifest_are_refused_before_writing(tmp_path: Path, suffix: str, kind: str) -> None:
    size = MAX_TEXT_BYTES + 1024
    value: Any = {"bytes": b"x" * size, "str": "y" * size, "many small": [b"z" * 1024] * (size // 1024 + 1)}[kind]
    with pytest.raises(torchkeep.UnsupportedObjectError, match=r"over the .*-byte limit that readers apply"):
        torchkeep.save({"w": torch.ones(2), "blob": value}, tmp_path / f"ckpt{suffix}")
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing staged


def test_a_large_value_is_fine_in_a_pth(tmp_path: Path) -> None:
    blob = b"x" * (MAX_TEXT_BYTES + 1024)
    torchkeep.save({"blob": blob}, tmp_path / "big.pth")
    assert torchkeep.load(tmp_path / "big.pth")["blob"] == blob


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_metadata_too_large_for_a_manifest_is_refused_and_nothing_is_published(tmp_path: Path, suffix: str) -> None:
    metadata = {f"k{i}": "v" * 1000 for i in range(MAX_MANIFEST_BYTES // 1000 + 10)}
    with pytest.raises(torchkeep.UnsupportedObjectError, match="limit"):
        torchkeep.save({"w": torch.ones(2)}, tmp_path / f"ckpt{suffix}", metadata=metadata)
    assert list(tmp_path.iterdir()) == []


def test_a_manager_applies_no_retention_after_a_commit_it_cannot_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchkeep import manager as manager_module

    with torchkeep.CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.save(1, w=torch.ones(2))
        real = manager_module.open_native

        def unreadable(storage: Any, key: str) -> Any:
            if key.endswith("step-00000002"):
                raise torchkeep.CorruptCheckpointError("cannot read it back", path=key)
            return real(storage, key)

        monkeypatch.setattr(manager_module, "open_native", unreadable)
        with pytest.raises(torchkeep.CorruptCheckpointError, match="cannot read it back"):
            mgr.save(2, w=torch.zeros(2))
    assert (tmp_path / "step-00000001").is_dir()  # the last good step was not deleted by retention
    assert torch.equal(torchkeep.load(tmp_path / "step-00000001")["w"], torch.ones(2))


# -- views: lazy bits, slices, expansions, nested ----------------------------------------------


def lazy_views() -> list[tuple[str, dict[str, torch.Tensor]]]:
    c = torch.randn(4, dtype=torch.complex64)
    r = torch.randn(4)
    return [
        ("conj", {"c": c, "cc": c.conj()}),
        ("neg", {"c": c, "n": c._neg_view()}),
        ("conj of a view", {"v": c[1:], "cv": c[1:].conj()}),
        ("conj and neg", {"c": c.conj(), "cn": c.conj()._neg_view(), "plain": c}),
        ("real neg", {"r": r, "n": r._neg_view()}),
    ]


@pytest.mark.parametrize("suffix", [*SUFFIXES, ".pth"])
@pytest.mark.parametrize(("label", "state"), lazy_views(), ids=[label for label, _ in lazy_views()])
def test_lazily_conjugated_and_negated_views_keep_their_values(
    tmp_path: Path, suffix: str, label: str, state: dict[str, torch.Tensor]
) -> None:
    torchkeep.save(state, tmp_path / f"ckpt{suffix}")
    loaded = torchkeep.load(tmp_path / f"ckpt{suffix}")
    for name, value in state.items():
        expected = value.resolve_conj().resolve_neg()
        got = loaded[name].resolve_conj().resolve_neg()
        assert torch.equal(got, expected), f"{label}: {name} came back as another view's values"


def test_a_slice_saved_to_pth_carries_only_its_own_values(tmp_path: Path) -> None:
    big = torch.full((10_000_000,), 7.0)  # 40 MB
    big[:5] = torch.arange(5.0)
    weight = nn.Parameter(big[:5])
    state = {"slice": big[:5], "param": weight, "tied": weight, "row": torch.eye(1000)[3]}
    torchkeep.save(state, tmp_path / "small.pth")
    assert (tmp_path / "small.pth").stat().st_size < 100_000
    with zipfile.ZipFile(tmp_path / "small.pth") as archive:
        assert not any(b"\x00\x00\xe0\x40" * 8 in archive.read(i) for i in archive.namelist())  # no run of 7.0
    loaded = torch.load(tmp_path / "small.pth", weights_only=True)
    assert torch.equal(loaded["slice"], torch.arange(5.0)) and torch.equal(loaded["row"], torch.eye(1000)[3])
    assert isinstance(loaded["param"], nn.Parameter) and loaded["param"] is loaded["tied"]


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.zeros(1).expand(10**8),
        lambda: torch.zeros(4, 1).expand(4, 10**7),
        lambda: torch.zeros(3)[None].expand(10**7, 3),
        lambda: torch.as_strided(torch.zeros(8), (10**4, 10**4), (0, 0)),
    ],
    ids=["scalar", "column", "row", "as_strided"],
)
def test_an_expanded_view_is_refused_instead_of_written_out_whole(tmp_path: Path, suffix: str, make: Any) -> None:
    with pytest.raises(torchkeep.UnsupportedObjectError, match=r"expanded view .* would write every repeat"):
        torchkeep.save({"e": make()}, tmp_path / f"ckpt{suffix}")
    assert list(tmp_path.iterdir()) == []


def test_a_small_expansion_like_position_ids_still_saves(tmp_path: Path) -> None:
    state = {"position_ids": torch.arange(512).expand((1, -1)), "mask": torch.ones(1, 8).expand(64, 8)}
    torchkeep.save(state, tmp_path / "ckpt")
    loaded = torchkeep.load(tmp_path / "ckpt")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_a_nested_tensor_is_refused_for_being_nested(tmp_path: Path, layout: torch.layout) -> None:
    with pytest.warns(UserWarning) if layout == torch.strided else _nothing():
        nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=layout)
    with pytest.raises(torchkeep.UnsupportedObjectError, match="nested tensor") as caught:
        torchkeep.save({"n": nested}, tmp_path / "ckpt")
    assert "unbind" in str(caught.value)


class _nothing:
    """A context manager that expects nothing."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# -- damaged objects in an incremental directory ------------------------------------------------


def damage_first_object(run: Path, how: str) -> None:
    objects = sorted((run / "objects").iterdir())
    target = max(objects, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    if how == "bit flip":
        data[-100] ^= 0x10
    elif how == "truncated":
        data = data[: len(data) - 64]
    elif how == "other bytes":
        data[-256:] = bytes(256)
    elif how == "header":
        data[9] ^= 0xFF
    target.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["bit flip", "truncated", "other bytes", "header"])
def test_a_damaged_object_is_rewritten_not_shared(tmp_path: Path, how: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 4))
    frozen = model[0].weight.detach().clone()
    with torchkeep.CheckpointManager(tmp_path, incremental=True, rng=False) as mgr:
        mgr.save(1, model=model)
        damage_first_object(tmp_path, how)
        with torch.no_grad():
            model[1].weight.add_(1.0)  # the frozen layer stays the same: its object would be shared
        mgr.save(2, model=model)
    fresh = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 4))
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        record = mgr.restore(step=2, model=fresh)
    assert record is not None and torch.equal(fresh[0].weight, frozen)
    torchkeep.verify(tmp_path / "step-00000002")
    torchkeep.verify(tmp_path / "step-00000001")  # sharing the rewritten object repaired it too


# -- options that would fail only after a commit ------------------------------------------------

BAD_OPTIONS: list[dict[str, Any]] = [
    {"keep_last": 2.5},
    {"keep_last": math.inf},
    {"keep_last": True},
    {"keep_last": 0},
    {"keep_last": "3"},
    {"keep_last": np.int64(2)},
    {"keep_best": 1.5, "monitor": "loss"},
    {"keep_best": -1, "monitor": "loss"},
    {"keep_every": 2.0},
    {"keep_interval": math.inf},
    {"keep_interval": math.nan},
    {"keep_interval": -1},
    {"keep_interval": True},
    {"save_every": 2.5},
    {"save_interval": math.nan},
    {"max_staging_bytes": 1.5},
    {"retention": 3},
]


@pytest.mark.parametrize("options", BAD_OPTIONS, ids=[repr(o) for o in BAD_OPTIONS])
def test_bad_options_are_refused_at_construction(tmp_path: Path, options: dict[str, Any]) -> None:
    with pytest.raises(torchkeep.InvalidArgumentError, match=r"must be|must have"):
        torchkeep.CheckpointManager(tmp_path, **options)
    assert list(tmp_path.iterdir()) == []


# -- values already verified never change under the caller --------------------------------------


def scribble_over_shards(checkpoint: Path, *, truncate: bool = False) -> None:
    """Rewrite every data file in place, as another program could (not how torchkeep writes)."""
    for shard in checkpoint.glob("data-*"):
        with open(shard, "r+b") as f:
            size = shard.stat().st_size
            if truncate:
                f.truncate(64)
            else:
                f.seek(size // 2)
                f.write(b"\xff" * (size - size // 2))


def test_load_without_mmap_keeps_its_values_when_the_file_changes(tmp_path: Path) -> None:
    state = {"w": torch.arange(4096.0), "n": np.arange(512.0)}
    torchkeep.save(state, tmp_path / "ckpt")
    copied = torchkeep.load(tmp_path / "ckpt", mmap=False)
    mapped = torchkeep.load(tmp_path / "ckpt")
    scribble_over_shards(tmp_path / "ckpt")
    assert torch.equal(copied["w"], state["w"]) and np.array_equal(copied["n"], state["n"])
    assert not torch.equal(mapped["w"], state["w"])  # the hazard the docs state, for the mapped default
    scribble_over_shards(tmp_path / "ckpt", truncate=True)
    assert float(copied["w"].sum()) == float(state["w"].sum())  # touching every page: no SIGBUS


def test_restore_and_assign_leave_nothing_backed_by_the_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    extra = {"table": torch.arange(1000.0)}
    holder = Holder(torch.arange(2000.0))
    with torchkeep.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, model=model, optimizer=optimizer, extra=extra, holder=holder)
    torchkeep.save({"model": model.state_dict()}, tmp_path / "weights")
    expected_model = {k: v.clone() for k, v in model.state_dict().items()}
    expected_opt = {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()}

    fresh = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4))
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    table: dict[str, Any] = {}
    restored_holder = Holder(torch.zeros(1))
    with torchkeep.CheckpointManager(tmp_path / "run") as mgr:
        mgr.restore(model=fresh, optimizer=fresh_opt, extra=table, holder=restored_holder)
    with torch.device("meta"):
        assigned = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4))
    torchkeep.load_into(assigned, tmp_path / "weights", key="model", assign=True)
    for checkpoint in [*(tmp_path / "run").glob("step-*"), tmp_path / "weights"]:
        scribble_over_shards(checkpoint)
    for key, value in expected_model.items():
        assert torch.equal(fresh.state_dict()[key], value) and torch.equal(assigned.state_dict()[key], value)
    for key, value in expected_opt.items():
        assert torch.equal(fresh_opt.state_dict()["state"][0][key], value)
    assert torch.equal(table["table"], torch.arange(1000.0))
    assert torch.equal(restored_holder.value, torch.arange(2000.0))


class Holder:
    """A Stateful object of the user's that keeps the tensor it is given."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.value = state["value"]


# -- manifests that lie, with their own checksum recomputed -------------------------------------

LIES: list[Any] = [None, 0, -1, 2**70, 1.5, "x", "", [], {}, [1], [None], {"t": "nope"}, {"t": "tensor", "name": 3}]


def paths_in(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside a JSON document."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += paths_in(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out += paths_in(value, (*prefix, index))
    return out


def replaced(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    import copy

    out = copy.deepcopy(document)
    node = out
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return out


def outcome(call: Any) -> str:
    try:
        call()
    except torchkeep.TorchkeepError as err:
        return type(err).__name__
    return "ok"


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_a_lying_manifest_gets_a_typed_error_and_verify_refuses_what_load_refuses(
    tmp_path: Path, compression: str | None
) -> None:
    import json
    import random

    from tests.conftest import reseal

    weight = nn.Parameter(torch.randn(3, 4))
    state = {
        "w": weight,
        "tied": weight,
        "n": np.arange(6, dtype=np.int16).reshape(2, 3),
        "misc": (b"raw", math.nan, {"k": [1, None]}),
        "half": torch.ones(5, dtype=torch.bfloat16),
    }
    torchkeep.save(state, tmp_path / "ckpt", compression=compression)
    manifest_path = tmp_path / "ckpt" / "manifest.json"
    good = json.loads(manifest_path.read_text())
    candidates = [p for p in paths_in(good) if p[0] != "manifest_digest"]
    rng = random.Random(0)
    mismatches = []
    outcomes: dict[str, int] = {}
    for _ in range(400):
        path = rng.choice(candidates)
        lie = rng.choice(LIES)
        manifest_path.write_bytes(reseal(replaced(good, path, lie)))
        loaded = outcome(lambda: torchkeep.load(tmp_path / "ckpt"))
        verified = outcome(lambda: torchkeep.verify(tmp_path / "ckpt"))
        outcome(lambda: torchkeep.inspect(tmp_path / "ckpt"))  # typed or fine, never another exception
        outcome(lambda: torchkeep.load_into(nn.Linear(4, 3), tmp_path / "ckpt", key="w", strict=False))
        outcomes[loaded] = outcomes.get(loaded, 0) + 1
        if (loaded == "ok") != (verified == "ok"):
            mismatches.append((path, lie, loaded, verified))
    assert not mismatches, mismatches[:5]
    assert outcomes.get("CorruptCheckpointError", 0) > 100  # the lies were seen, not skipped


BLOAT = """
import json, resource, sys, torch, torchkeep
from torchkeep.manifest import MANIFEST_DIGEST, MAX_MANIFEST_BYTES, encode_sorted, seal
path, kind = sys.argv[1], sys.argv[2]
if kind.startswith("write-"):
    kind = kind[6:]
    torchkeep.save({"w": torch.ones(2)}, path)
    m = json.loads(open(path + "/manifest.json").read())
    unit, value = {"strings": (5, "ab"), "dicts": (3, {}), "lists": (3, []), "floats": (4, 1.5)}[kind]
    m["metadata"]["x"] = [value] * ((MAX_MANIFEST_BYTES - 4096) // unit)
    m.pop(MANIFEST_DIGEST)
    open(path + "/manifest.json", "wb").write(seal(encode_sorted(m)))
    sys.exit(0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    torchkeep.load(path)
    outcome = "loaded"
except torchkeep.TorchkeepError as err:
    outcome = type(err).__name__
print(json.dumps({"outcome": outcome, "peak": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024}))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "expected"), [("dicts", "CorruptCheckpointError"), ("strings", "loaded")])
def test_a_manifest_at_the_size_cap_parses_in_bounded_memory(tmp_path: Path, kind: str, expected: str) -> None:
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    path = str(tmp_path / "ckpt")
    subprocess.run([sys.executable, "-c", BLOAT, path, f"write-{kind}"], check=True, cwd=root)
    out = subprocess.run(
        [sys.executable, "-c", BLOAT, path, kind], check=True, cwd=root, capture_output=True, text=True
    )
    result = json.loads(out.stdout)
    assert result["outcome"] == expected
    assert result["peak"] < 1.5 * 2**30, f"{kind}: parsing took {result['peak'] / 2**30:.2f} GiB"


def test_a_pth_loaded_without_mmap_is_not_backed_by_the_file(tmp_path: Path) -> None:
    state = {"w": torch.arange(100_000.0)}
    torchkeep.save(state, tmp_path / "m.pth")
    copied = torchkeep.load(tmp_path / "m.pth", mmap=False)
    mapped = torchkeep.load(tmp_path / "m.pth")
    maps = Path("/proc/self/maps").read_text()
    assert str(tmp_path / "m.pth") in maps  # the mapped load's view
    del mapped
    import gc

    gc.collect()
    assert str(tmp_path / "m.pth") not in Path("/proc/self/maps").read_text()  # the copy holds no map
    assert torch.equal(copied["w"], state["w"])
