"""The hardening harness: hostile and damaged files, injected faults, killed and concurrent writers.

Every case must end in a typed TorchkeepError (or, for damage that touches
nothing that matters, in the very same data), never a traceback from a
dependency, never code run, never a committed checkpoint lost.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import pickle
import random
import re
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep
from tests.conftest import assert_same, causes, reseal
from torchkeep.manifest import seal
from torchkeep.scan import scan_file
from torchkeep.storage import LocalStorage

ROOT = Path(__file__).resolve().parents[1]
MARKER = "pwned-marker"


class SystemPayload:
    def __reduce__(self) -> Any:
        return (os.system, (f"touch {MARKER}",))


class EvalPayload:
    def __reduce__(self) -> Any:
        return (builtins.eval, (f"open('{MARKER}', 'w')",))


class SubprocessPayload:
    def __reduce__(self) -> Any:
        return (subprocess.call, (["touch", MARKER],))


PAYLOADS = {"os.system": SystemPayload, "builtins.eval": EvalPayload, "subprocess.call": SubprocessPayload}
HIDING_PLACES = {
    "top": lambda p: p,
    "dict value": lambda p: {"model": {"w": torch.ones(2)}, "x": p},
    "list item": lambda p: [torch.ones(1), p],
    "tuple in optimizer": lambda p: {"optimizer": {"param_groups": [{"lr": 0.1, "betas": (0.9, p)}]}},
    "deeply nested": lambda p: {"k": {"nested": [{"deep": p}]}},
}


def write_payload(path: Path, obj: Any, kind: str) -> None:
    if kind == "zip":
        torch.save(obj, path)
    elif kind == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj))


@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle"])
@pytest.mark.parametrize("place", HIDING_PLACES)
@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("suffix", [".pth", ".bin", ".ckpt"])
def test_pickle_payloads_never_run(
    tmp_path: Path, monkeypatch: Any, kind: str, place: str, payload: str, suffix: str
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / f"evil{suffix}"
    write_payload(path, HIDING_PLACES[place](PAYLOADS[payload]()), kind)
    for call in (torchkeep.load, torchkeep.inspect, torchkeep.verify):
        with pytest.raises(torchkeep.UnsafeCheckpointError):
            call(path)
    assert not scan_file(str(path)).ok
    assert not (tmp_path / MARKER).exists()


def test_trust_loads_a_whole_pickled_model_with_a_warning(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    torch.save(model, tmp_path / "model.pth")  # the seed's torch.save(model)
    with pytest.raises(torchkeep.UnsafeCheckpointError, match=r"torch\.nn\.modules\.linear\.Linear.*trust=True"):
        torchkeep.load(tmp_path / "model.pth")
    with pytest.warns(UserWarning, match="full unpickling"):
        loaded = torchkeep.load(tmp_path / "model.pth", trust=True)
    assert isinstance(loaded, torch.nn.Linear) and torch.equal(loaded.weight, model.weight)


def sample_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g).to(torch.bfloat16), "n": 5}


def files_of(path: Path) -> list[Path]:
    return sorted(path.iterdir()) if path.is_dir() else [path]


def outcome(path: Path, expected: Any) -> str:
    """'typed' for a TorchkeepError, 'same' for a load equal to the original; anything else fails the test."""
    try:
        loaded = torchkeep.load(path)
    except torchkeep.TorchkeepError:
        return "typed"
    assert_same(expected, loaded)
    return "same"


@pytest.mark.parametrize("name", ["ckpt", "ckpt.safetensors", "ckpt.pth", "ckpt-zstd"])
def test_truncation_at_many_lengths(tmp_path: Path, name: str) -> None:
    state = sample_state()
    target = tmp_path / name
    torchkeep.save(state, target, compression="zstd" if name.endswith("zstd") else None)
    for file in files_of(target):
        full = file.read_bytes()
        for length in sorted(
            {0, 1, 7, 8, 9, 16, 64, 100, len(full) // 3, len(full) // 2, len(full) - 8, len(full) - 1}
        ):
            if length >= len(full):
                continue
            file.write_bytes(full[:length])
            assert outcome(target, state) == "typed", f"{file.name} cut at {length} loaded"
        file.write_bytes(full)


@pytest.mark.parametrize("name", ["ckpt", "ckpt.safetensors", "ckpt-zstd"])
def test_bit_flips_anywhere(tmp_path: Path, name: str) -> None:
    state = sample_state()
    target = tmp_path / name
    torchkeep.save(state, target, compression="zstd" if name.endswith("zstd") else None)
    rng = random.Random(0)
    seen = {"typed": 0, "same": 0}
    for file in files_of(target):
        full = file.read_bytes()
        for position in sorted(rng.sample(range(len(full)), min(40, len(full)))):
            data = bytearray(full)
            data[position] ^= 1 << rng.randrange(8)
            file.write_bytes(bytes(data))
            seen[outcome(target, state)] += 1
        file.write_bytes(full)
    assert seen["typed"] > 0


def write_safetensors(path: Path, header: dict[str, Any], data: bytes = b"", length: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes((length if length is not None else len(raw)).to_bytes(8, "little") + raw + data)


CORRUPT = torchkeep.CorruptCheckpointError
UNSUPPORTED = torchkeep.UnsupportedFormatError


@pytest.mark.parametrize(
    ("header", "data", "length", "error", "message"),
    [
        pytest.param(
            {"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, None,
            CORRUPT, r"tensor 't' spans bytes 0\.\.16, beyond the file's data", id="lying offsets",
        ),
        pytest.param(
            {"t": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, b"\0" * 16, None,
            CORRUPT, r"tensor 't' has shape \[1099511627776, 1099511627776\] but 16 bytes", id="huge shape",
        ),
        pytest.param(
            {"t": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, b"\0" * 16, None,
            CORRUPT, r"tensor 't' spans bytes 16\.\.0", id="backwards",
        ),
        pytest.param(
            {"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, 2**63,
            CORRUPT, r"declares a 9223372036854775808-byte header, over the", id="huge header length",
        ),
        pytest.param(
            {"t": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16, None,
            CORRUPT, r"tensor 't' has a malformed entry", id="negative dim",
        ),
        pytest.param(
            {"t": {"dtype": "X99", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, None,
            UNSUPPORTED, r"has dtype 'X99', which this torchkeep cannot read", id="unknown dtype",
        ),
        pytest.param(
            {"t": {"dtype": "F32", "shape": [4]}}, b"\0" * 16, None,
            CORRUPT, r"tensor 't' has a malformed entry", id="missing offsets",
        ),
        pytest.param(
            {"a\u0000b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, None,
            CORRUPT, re.escape(r"tensor name 'a\x00b' holds a NUL byte"), id="NUL in name",
        ),
    ],
)  # fmt: skip
def test_lying_safetensors_headers_are_refused_before_allocating(
    tmp_path: Path, header: dict[str, Any], data: bytes, length: int | None, error: type[Exception], message: str
) -> None:
    path = tmp_path / "lie.safetensors"
    write_safetensors(path, header, data, length)
    with pytest.raises(error, match=message):
        torchkeep.load(path)


def test_duplicate_json_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.safetensors"
    entry = b'{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    raw = b'{"t": ' + entry + b', "t": ' + entry + b"}"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 4)
    with pytest.raises(torchkeep.CorruptCheckpointError, match="duplicate key"):
        torchkeep.load(path)
    torchkeep.save({"w": torch.ones(1)}, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "manifest.json"
    body = path.read_bytes().rpartition(b',"manifest_digest"')[0] + b"}"
    path.write_bytes(seal(body.replace(b'"format_version":1,', b'"format_version":1,"format_version":1,')))
    with pytest.raises(torchkeep.CorruptCheckpointError, match="duplicate key"):
        torchkeep.load(tmp_path / "ckpt")


def test_deep_json_is_refused(tmp_path: Path) -> None:
    torchkeep.save({"w": torch.ones(1)}, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(manifest)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(torchkeep.CorruptCheckpointError):
        torchkeep.load(tmp_path / "ckpt")


def test_path_escapes_are_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.safetensors").write_bytes(b"x" * 100)
    torchkeep.save({"w": torch.ones(4)}, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "manifest.json"
    good = json.loads(path.read_text())
    for shard in ("../secret.safetensors", "/etc/passwd", "..", ".", "", "manifest.json", "a/../../b", "x\u0000y"):
        bad = json.loads(json.dumps(good))
        bad["shards"][0]["file"] = shard
        bad["tensors"][0]["shard"] = shard
        path.write_bytes(reseal(bad))
        with pytest.raises(
            torchkeep.CorruptCheckpointError,
            match=re.escape(f"names shard {shard!r}, which is not a file inside the checkpoint"),
        ):
            torchkeep.load(tmp_path / "ckpt")
    path.write_bytes(reseal(good))
    shard = tmp_path / "ckpt" / "data-00000.safetensors"
    os.replace(shard, tmp_path / "outside.safetensors")
    os.symlink(tmp_path / "outside.safetensors", shard)
    with pytest.raises(torchkeep.CorruptCheckpointError, match="symbolic link"):
        torchkeep.load(tmp_path / "ckpt")


class FaultyStorage(LocalStorage):
    """A local disk that fails with ``error`` at the ``fail_at``-th write call of the next save."""

    def __init__(self, root: Path, fail_at: int, error: int) -> None:
        super().__init__(root)
        self.fail_at, self.error, self.calls = fail_at, error, 0
        self.injected: OSError | None = None  # the fault, once raised

    def begin(self, key: str, *, directory: bool) -> Any:
        txn = super().begin(key, directory=directory)
        original = txn.open
        storage = self

        def open_faulty(name: str = "") -> Any:
            f = original(name)
            real_write = f.write

            def write(data: Any) -> int:
                storage.calls += 1
                if storage.calls == storage.fail_at:
                    half = memoryview(data).cast("B")[: len(memoryview(data).cast("B")) // 2]
                    real_write(half)  # some bytes reach the disk, then it fails
                    storage.injected = OSError(storage.error, os.strerror(storage.error))
                    raise storage.injected
                return real_write(data)

            f.write = write
            return f

        txn.open = open_faulty
        return txn


def test_fault_at_every_write_call_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    old = sample_state()
    new = {"w": torch.zeros(300, 300), "x": [torch.ones(3)] * 4, "n": 6}
    torchkeep.save(old, "ckpt", storage=LocalStorage(tmp_path))
    counter = FaultyStorage(tmp_path / "count", fail_at=-1, error=errno.EIO)
    torchkeep.save(new, "ckpt", storage=counter)
    writes = counter.calls
    assert writes >= 3
    for error, reason in ((errno.ENOSPC, "the disk is full"), (errno.EIO, os.strerror(errno.EIO))):
        for fail_at in range(1, writes + 1):
            storage = FaultyStorage(tmp_path, fail_at=fail_at, error=error)
            with pytest.raises(torchkeep.StorageError, match=re.escape(reason)) as err:
                torchkeep.save(new, "ckpt", storage=storage)
            # The error is the injected fault at this very write, not some other failure.
            assert storage.injected is not None, f"no fault injected at write {fail_at}"
            assert storage.injected in causes(err.value)
            assert str(tmp_path) in str(err.value)
            assert sorted(os.listdir(tmp_path)) == ["ckpt", "count"]  # no staging left behind
            assert_same(old, torchkeep.load("ckpt", storage=LocalStorage(tmp_path)))


def test_failing_state_dict_surfaces_and_writes_nothing(tmp_path: Path) -> None:
    class Broken:
        def state_dict(self) -> dict[str, Any]:
            raise ZeroDivisionError("the user's bug")

        def load_state_dict(self, state: dict[str, Any]) -> None: ...

    with torchkeep.CheckpointManager(tmp_path) as mgr:
        with pytest.raises(ZeroDivisionError, match="the user's bug"):
            mgr.save(1, broken=Broken())
        assert mgr.list() == []
    assert [p for p in os.listdir(tmp_path) if not p.startswith(".")] == []


WRITER = textwrap.dedent(
    """
    import sys, torch, torchkeep
    path, value = sys.argv[1], float(sys.argv[2])
    for i in range(15):
        torchkeep.save({"w": torch.full((512, 512), value), "i": i}, path)
    """
)


def test_two_processes_saving_to_one_path(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "ckpt"), v], cwd=ROOT, stderr=subprocess.PIPE)
        for v in ("1", "2")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    loaded = torchkeep.load(tmp_path / "ckpt")  # whichever committed last, whole
    assert loaded["i"] == 14
    assert torch.equal(loaded["w"], torch.full((512, 512), loaded["w"][0, 0].item()))
    assert loaded["w"][0, 0].item() in (1.0, 2.0)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_random_bytes_of_every_kind_never_escape_as_untyped_errors(tmp_path: Path) -> None:
    rng = random.Random(1)
    for i in range(60):
        suffix = rng.choice(["", ".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".safetensors.index.json"])
        path = tmp_path / f"r{i}{suffix}"
        head = rng.choice([b"", b"PK\x03\x04", b"\x80\x02", b'{"', (50).to_bytes(8, "little") + b"{"])
        path.write_bytes(head + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 600))))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for call in (torchkeep.load, torchkeep.inspect, torchkeep.verify):
                error, message = expected_refusal(
                    suffix, head, verify=call is torchkeep.verify, load=call is torchkeep.load
                )
                with pytest.raises(error, match=message):
                    call(path)


def expected_refusal(suffix: str, head: bytes, *, verify: bool, load: bool = False) -> tuple[type[Exception], str]:
    """The error for random bytes after ``head`` in a file named ``*suffix``: what the bytes start with decides,
    then the suffix. ``verify`` checks every torch file as a zip; ``load`` checks the records of what looks like one."""
    torch_file = "is not a readable zip archive" if verify else "is not a readable torch file"
    if suffix == ".safetensors.index.json":
        return torchkeep.CorruptCheckpointError, r"The index .* is damaged"
    if head == b"PK\x03\x04":
        return torchkeep.CorruptCheckpointError, "is not a readable zip archive" if verify or load else torch_file
    if head == b"\x80\x02":
        return torchkeep.UnsafeCheckpointError, "is a plain pickle"
    if head.startswith((50).to_bytes(8, "little")) or suffix == ".safetensors":
        return torchkeep.CorruptCheckpointError, "is not a valid safetensors file"
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):  # the suffixes saved as torch zips
        return torchkeep.CorruptCheckpointError, torch_file
    return torchkeep.UnsupportedFormatError, "is not a checkpoint torchkeep can read"


def test_in_memory_hostile_pickle_bytes(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.save({"x": SystemPayload()}, buffer)
    storage = torchkeep.MemoryStorage()
    txn = storage.begin("evil.pth", directory=False)
    with txn.open() as f:
        f.write(buffer.getvalue())
    txn.commit()
    with pytest.raises(torchkeep.UnsafeCheckpointError):
        torchkeep.load("evil.pth", storage=storage)


ASYNC_SOAK = textwrap.dedent(
    """
    import sys, torch, torchkeep
    path = sys.argv[1]
    with torchkeep.CheckpointManager(path, async_save=True, keep_last=3) as mgr:
        step = 0
        while True:
            step += 1
            mgr.save(step, state={"w": torch.full((1024, 1024), float(step)), "step": step})
            print(step, flush=True)
    """
)


def test_async_writer_killed_at_random_moments(tmp_path: Path) -> None:
    rng = random.Random(2)
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", ASYNC_SOAK, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip().isdigit()
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        proc.communicate()
        with torchkeep.CheckpointManager(tmp_path) as mgr:
            records = mgr.list()
            assert records, "at least one checkpoint had committed"
            for record in records:
                torchkeep.verify(record.path)
                state: dict[str, Any] = {}
                mgr.restore(record.step, state=state)
                assert state["step"] == record.step and torch.equal(
                    state["w"], torch.full((1024, 1024), float(record.step))
                )


HOSTILE_MEMORY = textwrap.dedent(
    """
    import json, resource, sys, torch, torchkeep
    path = sys.argv[1]
    for shape in ([2**40, 2**40], [2**31, 2**31, 4], [10**12]):
        header = json.dumps({"t": {"dtype": "F32", "shape": shape, "data_offsets": [0, 16]}}).encode()
        open(path, "wb").write(len(header).to_bytes(8, "little") + header + bytes(16))
        try:
            torchkeep.load(path)
        except torchkeep.TorchkeepError:
            pass
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


def test_huge_declared_sizes_use_bounded_memory(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", HOSTILE_MEMORY, str(tmp_path / "huge.safetensors")],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    assert int(out.stdout.strip()) < 1_500_000  # KiB: the interpreter and torch, not the declared sizes


class ReadOnlyStorage(LocalStorage):
    def begin(self, key: str, *, directory: bool) -> Any:
        raise OSError(errno.EROFS, "Read-only file system", str(self.root))


def test_read_only_target_is_an_error_never_a_silent_success(tmp_path: Path) -> None:
    with pytest.raises(torchkeep.StorageError, match="Read-only"):
        torchkeep.save({"w": torch.ones(1)}, "ckpt", storage=ReadOnlyStorage(tmp_path))
    assert not (tmp_path / "ckpt").exists()
