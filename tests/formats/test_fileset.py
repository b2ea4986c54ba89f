"""Sealed folders: a checksum manifest over the files another engine wrote, read by verify and inspect."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash
from safetensors.torch import save_file
from torch import nn

import torchkeep
from torchkeep.cli import main
from torchkeep.formats import Format, open_checkpoint
from torchkeep.formats.detect import detect_format
from torchkeep.formats.fileset import (
    FILESET_NAME,
    FolderInfo,
    FolderVerifyReport,
    read_folder_manifest,
    seal_folder,
    verify_folder,
)
from torchkeep.manifest import encode_sorted, seal
from torchkeep.storage import LocalStorage, MemoryStorage


@dataclass
class Args:
    """Stands for an engine's own pickled object (a Trainer's TrainingArguments)."""

    lr: float = 0.1


def engine_folder(root: Path) -> Path:
    """A folder as an engine leaves it: JSON, safetensors, a clean torch file, a pickled object in a sub-folder."""
    folder = root / "checkpoint-7"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"hidden": 32}))
    save_file({"w": torch.arange(6, dtype=torch.float32)}, str(folder / "model.safetensors"))
    torch.save({"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]}, folder / "optimizer.pt")
    torch.save(Args(), folder / "sub" / "args.bin")
    return folder


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != FILESET_NAME
    }


def flip(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_the_seal_lists_every_file_with_its_size_and_checksum(tmp_path: Path) -> None:
    folder = engine_folder(tmp_path)
    written = seal_folder(folder, engine="test-engine", metadata={"step": 7, "loss": torch.tensor(0.5)})
    expected = {name: (len(data), xxhash.xxh3_64_hexdigest(data)) for name, data in files_of(folder).items()}
    assert {f.path: (f.size, f.checksum) for f in written.files} == expected
    assert set(expected) == {"config.json", "model.safetensors", "optimizer.pt", "sub/args.bin"}
    read = read_folder_manifest(folder)
    assert read == written
    assert (read.engine, read.metadata, read.format_version) == ("test-engine", {"step": 7, "loss": 0.5}, 1)
    raw = (folder / FILESET_NAME).read_bytes()
    assert raw.endswith(b'"}') and b'"manifest_digest":"' in raw
    report = torchkeep.verify(folder)
    assert isinstance(report, FolderVerifyReport)
    assert (report.files, report.nbytes, report.method, report.unlisted) == (4, written.nbytes, "xxh3-64", ())
    assert str(report).startswith(f"OK {folder}: 4 files")


def test_sealing_fsyncs_every_file_and_folder_before_the_manifest_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = engine_folder(tmp_path)
    synced: list[tuple[str, bool]] = []  # (what was fsync'd, whether the manifest was there yet)
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), (folder / FILESET_NAME).exists()))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    seal_folder(folder, engine="test-engine")
    before_manifest = {path for path, manifest_there in synced if not manifest_there}
    assert {str(folder / name) for name in files_of(folder)} <= before_manifest
    assert {str(folder), str(folder / "sub")} <= before_manifest
    assert any(manifest_there for _, manifest_there in synced)  # the rename into place is made durable too
    assert sorted(os.listdir(folder)) == sorted(
        ["config.json", "model.safetensors", "optimizer.pt", "sub", FILESET_NAME]
    )


def test_verify_names_every_damaged_missing_and_resized_file(tmp_path: Path) -> None:
    folder = engine_folder(tmp_path)
    seal_folder(folder, engine="test-engine")
    flip(folder / "model.safetensors")
    os.truncate(folder / "optimizer.pt", 100)
    (folder / "config.json").unlink()
    with pytest.raises(torchkeep.ChecksumMismatchError) as caught:
        torchkeep.verify(folder)
    assert caught.value.damaged == ["config.json", "model.safetensors", "optimizer.pt"]
    message = str(caught.value)
    assert "'config.json' is missing" in message
    assert "'model.safetensors' fails its checksum" in message
    assert "'optimizer.pt' is 100 bytes, not" in message
    assert "sub/args.bin" not in message
    with pytest.raises(torchkeep.ChecksumMismatchError, match="3 of its 4 sealed files"):
        verify_folder(folder)


def test_a_file_added_after_the_seal_is_reported_but_is_not_damage(tmp_path: Path) -> None:
    folder = engine_folder(tmp_path)
    seal_folder(folder, engine="test-engine")
    (folder / "sub" / "notes.txt").write_text("added later")
    report = verify_folder(folder)
    assert report.unlisted == ("sub/notes.txt",)
    assert "sub/notes.txt" in str(report)
    seal_folder(folder, engine="test-engine")  # sealing again lists it
    assert "sub/notes.txt" in {f.path for f in read_folder_manifest(folder).files}
    assert verify_folder(folder).unlisted == ()


def test_progress_reaches_the_total(tmp_path: Path) -> None:
    folder = engine_folder(tmp_path)
    manifest = seal_folder(folder, engine="test-engine")
    calls: list[tuple[int, int]] = []
    verify_folder(folder, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (manifest.nbytes, manifest.nbytes)
    assert all(done <= total for done, total in calls)


def rewrite_manifest(folder: Path, change: Any) -> None:
    """Rewrite the seal with ``change(data)`` applied, digest recomputed: a well-formed but different manifest."""
    data = json.loads((folder / FILESET_NAME).read_bytes())
    del data["manifest_digest"]
    change(data)
    (folder / FILESET_NAME).write_bytes(bytes(seal(bytearray(encode_sorted(data)))))


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda d: d.update(format_version=2), torchkeep.UnsupportedFormatError, "Upgrade torchkeep"),
        (lambda d: d.update(format="someone.else"), torchkeep.UnsupportedFormatError, "not a torchkeep file manifest"),
        (lambda d: d["files"][0].update(path="../escape"), torchkeep.CorruptCheckpointError, "'../escape'"),
        (lambda d: d["files"][1].update(path=d["files"][0]["path"]), torchkeep.CorruptCheckpointError, "appears twice"),
        (lambda d: d["files"][0].update(path=FILESET_NAME), torchkeep.CorruptCheckpointError, "manifest itself"),
        (lambda d: d["files"][0].update(size=-1), torchkeep.CorruptCheckpointError, "damaged"),
        (lambda d: d.update(extra=1), torchkeep.CorruptCheckpointError, "not in the form torchkeep writes"),
    ],
)
def test_a_manifest_that_is_not_ours_or_names_bad_paths_is_refused(
    tmp_path: Path, change: Any, error: type[Exception], match: str
) -> None:
    folder = engine_folder(tmp_path)
    seal_folder(folder, engine="test-engine")
    rewrite_manifest(folder, change)
    with pytest.raises(error, match=match):
        torchkeep.verify(folder)


def test_a_damaged_or_truncated_manifest_is_reported(tmp_path: Path) -> None:
    folder = engine_folder(tmp_path)
    seal_folder(folder, engine="test-engine")
    manifest = folder / FILESET_NAME
    good = manifest.read_bytes()
    flip(manifest, offset=len(good) // 2)
    with pytest.raises(torchkeep.ChecksumMismatchError) as caught:
        torchkeep.verify(folder)
    assert caught.value.damaged == [FILESET_NAME]
    manifest.write_bytes(good[: len(good) // 2])
    with pytest.raises(torchkeep.CorruptCheckpointError, match="truncated"):
        torchkeep.inspect(folder)


def test_detection_an_unsealed_folder_and_a_native_checkpoint(tmp_path: Path) -> None:
    folder = engine_folder(tmp_path)
    storage = LocalStorage(tmp_path)
    with pytest.raises(torchkeep.CheckpointNotFoundError, match=FILESET_NAME):
        torchkeep.verify(folder)  # written, never sealed: not a checkpoint
    seal_folder(folder, engine="test-engine")
    assert detect_format(storage, folder.name) is Format.FILESET
    assert open_checkpoint(storage, folder.name).format is Format.FILESET
    torchkeep.save({"w": torch.ones(2)}, tmp_path / "native")
    with pytest.raises(torchkeep.InvalidArgumentError, match="native torchkeep checkpoint"):
        seal_folder(tmp_path / "native", engine="test-engine")
    (tmp_path / "native" / FILESET_NAME).write_bytes((folder / FILESET_NAME).read_bytes())
    assert detect_format(storage, "native") is Format.NATIVE  # its own manifest wins


def test_load_refuses_a_sealed_folder_and_says_what_to_do(tmp_path: Path) -> None:
    folder = engine_folder(tmp_path)
    seal_folder(folder, engine="test-engine")
    with pytest.raises(torchkeep.UnsupportedFormatError) as caught:
        torchkeep.load(folder)
    message = str(caught.value)
    assert "written by test-engine" in message and "the engine that wrote it" in message
    assert f"torchkeep.load('{folder}/model.safetensors')" in message
    with pytest.raises(torchkeep.UnsupportedFormatError, match="test-engine"):
        torchkeep.load_into(nn.Linear(2, 3), folder)
    with pytest.raises(torchkeep.UnsupportedFormatError, match="test-engine"):
        torchkeep.load_into(torch.optim.SGD(nn.Linear(2, 3).parameters(), lr=0.1), folder)
    assert torch.equal(torchkeep.load(folder / "model.safetensors")["w"], torch.arange(6, dtype=torch.float32))


def safetensors_with_header_length(path: Path, length: int) -> None:
    """A valid safetensors file whose 8-byte header length is ``length`` (padded with spaces, as allowed)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", length) + header.ljust(length, b" ") + struct.pack("<2f", 1.0, 2.0))


def test_inspect_says_which_pickles_need_trust(tmp_path: Path) -> None:
    folder = engine_folder(tmp_path)
    # A header length of 0x280 bytes begins the file with 0x80 0x02, the start of a protocol-2 pickle.
    safetensors_with_header_length(folder / "odd.safetensors", 0x280)
    assert (folder / "odd.safetensors").read_bytes()[:2] == b"\x80\x02"
    assert torch.equal(torchkeep.load(folder / "odd.safetensors")["w"], torch.tensor([1.0, 2.0]))
    seal_folder(folder, engine="test-engine", metadata={"step": 7})
    info = torchkeep.inspect(folder)
    assert isinstance(info, FolderInfo)
    assert (info.format, info.engine, info.metadata) == ("fileset", "test-engine", {"step": 7})
    kinds = {f.path: f.pickle for f in info.files}
    assert kinds == {
        "config.json": "none",
        "model.safetensors": "none",
        "odd.safetensors": "none",
        "optimizer.pt": "safe",
        "sub/args.bin": "needs trust",
    }
    assert info.needs_trust == ["sub/args.bin"]
    (args,) = [f for f in info.files if f.path == "sub/args.bin"]
    assert any(f"{__name__}.Args" in finding for finding in args.findings)
    assert info.nbytes == sum(len(data) for data in files_of(folder).values())
    assert "needs trust" in str(info) and "sub/args.bin" in str(info)


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, 4))
        self.b = nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))


def test_a_sealed_sharded_model_still_loads(tmp_path: Path) -> None:
    folder = tmp_path / "hub"
    folder.mkdir()
    w, b = torch.arange(12, dtype=torch.float32).reshape(3, 4), torch.ones(4, dtype=torch.bfloat16)
    save_file({"w": w}, str(folder / "model-1.safetensors"))
    save_file({"b": b}, str(folder / "model-2.safetensors"))
    index = {"weight_map": {"w": "model-1.safetensors", "b": "model-2.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    torch.save({"step": 3}, folder / "optimizer.pt")
    seal_folder(folder, engine="test-engine")
    loaded = torchkeep.load(folder)
    assert torch.equal(loaded["w"], w) and torch.equal(loaded["b"], b)
    model = Pair()
    assert sorted(torchkeep.load_into(model, folder).loaded) == ["b", "w"]
    assert torch.equal(model.w, w) and torch.equal(model.b, b)
    info = torchkeep.inspect(folder)
    assert isinstance(info, FolderInfo)
    assert {t.name for t in info.tensors} == {"w", "b"} and len(info.files) == 4
    report_v = torchkeep.verify(folder)
    assert isinstance(report_v, FolderVerifyReport) and (report_v.tensors, report_v.files) == (2, 4)
    flip(folder / "model-2.safetensors")
    with pytest.raises(torchkeep.ChecksumMismatchError) as caught:
        torchkeep.verify(folder)
    assert caught.value.damaged == ["model-2.safetensors"]
    (folder / "model-1.safetensors").unlink()  # the model cannot even be opened: every damaged file is named
    with pytest.raises(torchkeep.ChecksumMismatchError) as caught:
        torchkeep.load(folder)
    assert caught.value.damaged == ["model-1.safetensors", "model-2.safetensors"]


@pytest.mark.parametrize("case", ["missing", "file", "empty", "link", "metadata", "engine"])
def test_seal_refuses_what_it_cannot_seal(tmp_path: Path, case: str) -> None:
    folder = engine_folder(tmp_path)
    target: Path = folder
    kwargs: dict[str, Any] = {"engine": "test-engine"}
    expected: type[Exception] = torchkeep.InvalidArgumentError
    if case == "missing":
        target, expected = tmp_path / "nothing", torchkeep.CheckpointNotFoundError
    elif case == "file":
        target = folder / "config.json"
    elif case == "empty":
        target = tmp_path / "empty"
        target.mkdir()
    elif case == "link":
        (folder / "sub" / "elsewhere.json").symlink_to(tmp_path)
    elif case == "metadata":
        kwargs["metadata"], expected = {"model": nn.Linear(1, 1)}, torchkeep.UnsupportedObjectError
    else:
        kwargs["engine"] = ""
    with pytest.raises(expected):
        seal_folder(target, **kwargs)
    assert not (folder / FILESET_NAME).exists()


def test_a_file_replaced_by_a_link_after_sealing_is_damage(tmp_path: Path) -> None:
    folder = engine_folder(tmp_path)
    seal_folder(folder, engine="test-engine")
    outside = tmp_path / "same-bytes.json"
    outside.write_bytes((folder / "config.json").read_bytes())
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(outside)
    with pytest.raises(torchkeep.ChecksumMismatchError, match="symbolic link") as caught:
        torchkeep.verify(folder)
    assert caught.value.damaged == ["config.json"]


def test_a_folder_in_memory_is_sealed_and_verified_the_same_way() -> None:
    storage = MemoryStorage()
    with storage.begin("run/ckpt", directory=True) as txn:
        for name, data in {"a.bin": b"\x00" * 100, "deep/b.json": b"{}"}.items():
            with txn.open(name) as f:
                f.write(data)
    manifest = seal_folder("run/ckpt", engine="test-engine", storage=storage)
    assert [f.path for f in manifest.files] == ["a.bin", "deep/b.json"]
    assert torchkeep.verify("run/ckpt", storage=storage).files == 2  # type: ignore[attr-defined]
    with storage.begin("run/ckpt/a.bin", directory=False) as txn, txn.open() as f:
        f.write(b"\x01" * 100)
    with pytest.raises(torchkeep.ChecksumMismatchError) as caught:
        verify_folder(storage.describe("run/ckpt"))
    assert caught.value.damaged == ["a.bin"]


def test_the_command_line_verifies_and_inspects_a_sealed_folder(tmp_path: Path, capsys: Any) -> None:
    folder = engine_folder(tmp_path)
    seal_folder(folder, engine="test-engine")
    assert main(["verify", str(folder), "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert (result["ok"], result["files"], result["unlisted"]) == (True, 4, [])
    assert main(["inspect", str(folder), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "fileset" and data["engine"] == "test-engine"
    assert {f["path"]: f["pickle"] for f in data["files"]}["sub/args.bin"] == "needs trust"
    assert data["needs_trust"] == ["sub/args.bin"]
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "sub/args.bin" in out and "needs trust" in out and "test-engine" in out
    assert main(["verify", str(folder)]) == 0
    assert "4 files" in capsys.readouterr().out
    os.truncate(folder / "optimizer.pt", 10)
    assert main(["verify", str(folder), "--json"]) == 1
    (result,) = json.loads(capsys.readouterr().out)
    assert result["ok"] is False and result["damaged"] == ["optimizer.pt"]
    assert main(["verify", str(folder)]) == 1
    assert "optimizer.pt" in capsys.readouterr().out


def test_a_file_manifest_past_the_parsing_bound_is_refused_before_it_is_parsed() -> None:
    from torchkeep.formats.fileset import FolderManifest

    raw = b"[" * 1_000_001 + b"{}" * 1_000_001 + b"]" * 1_000_001  # more containers than any reader parses
    with pytest.raises(torchkeep.CorruptCheckpointError, match="objects and arrays"):
        FolderManifest.from_bytes(raw, path="x")
