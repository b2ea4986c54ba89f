"""The command's contract: exit statuses, --json everywhere, --version, --debug, reads that never create."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
import torch
from safetensors.torch import save_file

import torchkeep
from torchkeep.cli import EXIT_CHANGED, EXIT_ERROR, EXIT_OK, EXIT_STRUCTURE_ONLY, cli, main

ROOT = Path(__file__).resolve().parents[1]


def run(capsys: Any, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def every_command() -> list[click.Command]:
    commands: list[click.Command] = []
    for command in cli.commands.values():
        if isinstance(command, click.Group):
            commands.extend(command.commands.values())
        else:
            commands.append(command)
    return commands


def test_every_command_takes_json() -> None:
    missing = [c.name for c in every_command() if not any(p.name == "as_json" for p in c.params)]
    assert missing == []


def test_version_and_help_without_importing_torch() -> None:
    code = (
        "import sys; from torchkeep.cli import cli; assert 'torch' not in sys.modules, 'torch imported';"
        "from torchkeep.cli import main; sys.exit(main(['--version']))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"torchkeep, version {torchkeep.__version__}"


def test_without_the_cli_extra_one_line_says_what_to_install() -> None:
    code = "import sys; sys.modules['click'] = None; from torchkeep.__main__ import main; sys.exit(main())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == EXIT_ERROR
    assert out.stderr.strip() == (
        "error: the torchkeep command needs the cli extra (click is not installed): pip install 'torchkeep[cli]'"
    )


def test_debug_is_accepted_anywhere(capsys: Any, tmp_path: Path) -> None:
    code, _, err = run(capsys, "inspect", str(tmp_path / "missing"))
    assert code == EXIT_ERROR and err.startswith("error: ")
    with pytest.raises(torchkeep.CheckpointNotFoundError):
        main(["inspect", str(tmp_path / "missing"), "--debug"])


@pytest.mark.parametrize(
    "args",
    [["ls", "{p}"], ["prune", "{p}", "--keep-last", "1"], ["plot", "{p}"], ["models", "ls", "{p}"],
     ["models", "search", "{p}"], ["models", "show", "{p}", "m"]],
)  # fmt: skip
def test_reading_a_missing_or_unrelated_folder_creates_nothing(capsys: Any, tmp_path: Path, args: list[str]) -> None:
    missing = tmp_path / "typo"
    code, _, err = run(capsys, *[a.format(p=missing) for a in args])
    assert code == EXIT_ERROR and "is not an existing directory" in err
    assert not missing.exists()
    if args[0] == "models":
        checkpoint = tmp_path / "ckpt"
        torchkeep.save({"w": torch.ones(1)}, checkpoint)
        before = sorted(p.name for p in checkpoint.iterdir())
        code, _, err = run(capsys, *[a.format(p=checkpoint) for a in args])
        assert code == EXIT_ERROR and "is not a model registry" in err
        assert sorted(p.name for p in checkpoint.iterdir()) == before  # no index.sqlite written into it


def test_verify_statuses(capsys: Any, tmp_path: Path) -> None:
    torchkeep.save({"w": torch.ones(64)}, tmp_path / "good")
    assert run(capsys, "verify", str(tmp_path / "good"))[0] == EXIT_OK
    save_file({"w": torch.ones(64)}, str(tmp_path / "hub.safetensors"))
    data = bytearray((tmp_path / "hub.safetensors").read_bytes())
    data[-3] ^= 0x40  # a bit flip that no checksum can see
    (tmp_path / "hub.safetensors").write_bytes(bytes(data))
    code, out, _ = run(capsys, "verify", str(tmp_path / "hub.safetensors"))
    assert code == EXIT_STRUCTURE_ONLY and "STRUCTURE ONLY" in out and "no checksums" in out
    shard = next((tmp_path / "good").glob("data-*"))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40
    shard.write_bytes(bytes(data))
    code, out, _ = run(capsys, "verify", str(tmp_path / "good"), str(tmp_path / "hub.safetensors"))
    assert code == EXIT_CHANGED and "FAIL" in out


def test_verify_a_manager_directory_and_a_registry(capsys: Any, tmp_path: Path) -> None:
    with torchkeep.CheckpointManager(tmp_path / "run") as mgr:
        for step in (1, 2, 3):
            mgr.save(step, w=torch.full((8,), float(step)))
    registry = torchkeep.Registry(tmp_path / "registry")
    registry.register("m", tmp_path / "run" / "step-00000001")
    registry.register("m", tmp_path / "run" / "step-00000002")
    code, out, _ = run(capsys, "verify", str(tmp_path / "run"))
    assert code == EXIT_OK and "3 of 3 verified, 0 failed" in out
    code, out, _ = run(capsys, "verify", str(tmp_path / "registry"), "--json")
    assert code == EXIT_OK and len(json.loads(out)) == 2


def test_scan_of_pickle_free_files_is_clean(capsys: Any, tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, str(tmp_path / "w.safetensors"))
    torchkeep.save({"w": torch.ones(2)}, tmp_path / "ckpt")
    code, out, _ = run(capsys, "scan", str(tmp_path / "w.safetensors"), str(tmp_path / "ckpt"))
    assert code == EXIT_OK and out.count("no pickle") == 2


def test_convert_keeps_the_metadata_or_says_it_cannot(capsys: Any, tmp_path: Path) -> None:
    torchkeep.save({"w": torch.ones(2)}, tmp_path / "src", metadata={"epoch": 3})
    run(capsys, "convert", str(tmp_path / "src"), str(tmp_path / "out.safetensors"))
    assert torchkeep.inspect(tmp_path / "out.safetensors").metadata == {"epoch": 3}
    code, out, _ = run(capsys, "convert", str(tmp_path / "src"), str(tmp_path / "out.pth"))
    assert code == EXIT_OK and "metadata not kept" in out and "epoch" in out


def test_ls_shows_and_prune_removes_what_a_killed_save_left(capsys: Any, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with torchkeep.CheckpointManager(run_dir) as mgr:
        mgr.save(1, w=torch.ones(4))
    killed = "import sys, torch, torchkeep; t = torchkeep.LocalStorage(sys.argv[1]).begin('step-00000002', " \
        "directory=True); f = t.open('data.bin'); f.write(b'x' * 4096); f.close(); import os; os._exit(0)"  # fmt: skip
    live = torchkeep.LocalStorage(run_dir).begin("step-00000003", directory=True)  # a writer still at work
    subprocess.run([sys.executable, "-c", killed, str(run_dir)], check=True, cwd=ROOT)
    try:
        listing = json.loads(run(capsys, "ls", str(run_dir), "--json")[1])
        assert len(listing["leftovers"]) == 2 and all(item["size"] >= 0 for item in listing["leftovers"])
        code, out, _ = run(capsys, "prune", str(run_dir), "--json")
        assert code == EXIT_OK
        removed = json.loads(out)["leftovers_removed"]
        assert len(removed) == 1 and "step-00000002" in removed[0]
        assert [i["name"] for i in json.loads(run(capsys, "ls", str(run_dir), "--json")[1])["leftovers"]] == [
            n for n in (i["name"] for i in listing["leftovers"]) if "step-00000003" in n
        ]
    finally:
        live.abort()


class Payload:
    def __reduce__(self) -> Any:
        return (print, ("ran",))


@pytest.mark.parametrize("command", ["inspect", "verify", "convert", "diff"])
def test_trust_is_accepted_where_the_message_asks_for_it(capsys: Any, tmp_path: Path, command: str) -> None:
    torch.save({"w": torch.ones(2), "extra": Payload()}, tmp_path / "m.pth")
    args = {"inspect": [str(tmp_path / "m.pth")], "verify": [str(tmp_path / "m.pth")],
            "convert": [str(tmp_path / "m.pth"), str(tmp_path / "out.pth")],
            "diff": [str(tmp_path / "m.pth"), str(tmp_path / "m.pth")]}[command]  # fmt: skip
    code, out, err = run(capsys, command, *args)
    assert code == (EXIT_CHANGED if command == "verify" else EXIT_ERROR) and "trust=True" in out + err
    with pytest.warns(UserWarning, match="trust=True"):
        code, out, err = run(capsys, command, *args, "--trust")
    assert code == EXIT_OK, err
