"""A real Hugging Face Trainer on a tiny BERT: sealed checkpoints, a killed save skipped, an exact resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint

import torchkeep
from torchkeep.cli import main
from torchkeep.formats.fileset import FILESET_NAME, FolderInfo, read_folder_manifest
from torchkeep.integrations.transformers import ENGINE, TorchkeepCallback, latest_valid_checkpoint

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 6  # saved every 2 steps: checkpoint-2, -4 and -6


class Data(torch.utils.data.Dataset):
    """32 random token sequences, labelled by the parity of their first token."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (32, 8), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i, 0] % 2}


def make_trainer(output_dir: Path | str, callbacks: list[Any]) -> Trainer:
    """The same tiny BERT run every time: same initial weights, same data, same seed."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16,
    )  # fmt: skip
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=MAX_STEPS, save_steps=2, per_device_train_batch_size=4,
        report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    return Trainer(model=BertForSequenceClassification(config), args=args, train_dataset=Data(), callbacks=callbacks)


class KillAtSave(TrainerCallback):
    """Placed before TorchkeepCallback: the process dies after the Trainer wrote checkpoint-N, before the seal."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class Steps(TrainerCallback):
    """Records the global step after every optimizer step."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.seen.append(state.global_step)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run with the callback; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("trainer") / "out"
    make_trainer(out, [TorchkeepCallback(metadata={"run": "tiny-bert"})]).train()
    return out


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "out"))


def trainer_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name != FILESET_NAME}


def test_every_checkpoint_is_sealed_after_the_trainer_saves_it(run: Path) -> None:
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for step in (2, 4, 6):
        folder = run / f"checkpoint-{step}"
        manifest = read_folder_manifest(folder)
        assert {f.path for f in manifest.files} == trainer_files(folder)
        assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= trainer_files(folder)
        assert manifest.engine == ENGINE == "transformers.Trainer"
        assert manifest.metadata["global_step"] == step and manifest.metadata["run"] == "tiny-bert"
        assert torchkeep.verify(folder).files == len(manifest.files)  # type: ignore[attr-defined]
    assert latest_valid_checkpoint(run) == str(run / "checkpoint-6")


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt"])
def test_a_checkpoint_truncated_after_the_fact_is_skipped(run: Path, name: str) -> None:
    damaged = run / "checkpoint-6" / name
    os.truncate(damaged, damaged.stat().st_size // 2)
    assert get_last_checkpoint(str(run)) == str(run / "checkpoint-6")  # what the Trainer would resume from
    for verify in (True, False):
        with pytest.warns(RuntimeWarning, match=f"checkpoint-6.*'{name}'"):
            assert latest_valid_checkpoint(run, verify=verify) == str(run / "checkpoint-4")


def test_a_changed_byte_is_caught_by_the_full_check_only(run: Path) -> None:
    weights = run / "checkpoint-6" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="'model.safetensors' fails its checksum"):
        assert latest_valid_checkpoint(run) == str(run / "checkpoint-4")
    assert latest_valid_checkpoint(run, verify=False) == str(run / "checkpoint-6")  # sizes only, as documented


def test_no_checkpoint_to_resume_from_is_none(tmp_path: Path) -> None:
    assert latest_valid_checkpoint(tmp_path / "never-written") is None
    (tmp_path / "out" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint-2" / "config.json").write_text("{}")
    with pytest.warns(RuntimeWarning, match=f"no {FILESET_NAME}"):
        assert latest_valid_checkpoint(tmp_path / "out") is None


CHILD = textwrap.dedent(
    """
    import sys
    from tests.integrations.test_transformers import KillAtSave, make_trainer
    from torchkeep.integrations.transformers import TorchkeepCallback

    make_trainer(sys.argv[1], [KillAtSave(int(sys.argv[2])), TorchkeepCallback()]).train()
    print("finished")
    """
)


def test_a_run_killed_while_saving_resumes_from_the_last_sealed_checkpoint(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(out), "4"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert (out / "checkpoint-2" / FILESET_NAME).exists()
    half = out / "checkpoint-4"
    assert "model.safetensors" in trainer_files(half) and not (half / FILESET_NAME).exists()
    assert get_last_checkpoint(str(out)) == str(half)  # the Trainer's own choice: the unsealed one
    with pytest.warns(RuntimeWarning, match=f"checkpoint-4: it has no {FILESET_NAME}"):
        resume_from = latest_valid_checkpoint(out)
    assert resume_from == str(out / "checkpoint-2")

    steps = Steps()
    trainer = make_trainer(out, [TorchkeepCallback(), steps])
    trainer.train(resume_from_checkpoint=resume_from)
    assert steps.seen == [3, 4, 5, 6]  # continued after step 2, ran to the end
    assert trainer.state.global_step == MAX_STEPS
    assert latest_valid_checkpoint(out) == str(out / "checkpoint-6")
    torchkeep.verify(out / "checkpoint-4")  # saved again by the resumed run, and sealed this time
    # Model, optimizer, scheduler, RNG and data position came back: the weights are the uninterrupted run's.
    resumed = load_file(str(out / "checkpoint-6" / "model.safetensors"))
    uninterrupted = load_file(str(trained / "checkpoint-6" / "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_inspect_names_the_pickles_only_the_trainer_should_open(run: Path) -> None:
    info = torchkeep.inspect(run / "checkpoint-4")
    assert isinstance(info, FolderInfo) and info.engine == ENGINE
    kinds = {f.path: f.pickle for f in info.files}
    assert kinds["model.safetensors"] == kinds["config.json"] == kinds["trainer_state.json"] == "none"
    assert kinds["optimizer.pt"] == kinds["scheduler.pt"] == "safe"
    assert info.needs_trust == ["rng_state.pth", "training_args.bin"]
    (args,) = [f for f in info.files if f.path == "training_args.bin"]
    assert "imports transformers.training_args.TrainingArguments" in args.findings
    with pytest.raises(torchkeep.UnsupportedFormatError, match="resume_from_checkpoint"):
        torchkeep.load(run / "checkpoint-4")


def test_the_command_line_on_a_checkpoint_and_on_the_output_dir(run: Path, capsys: Any) -> None:
    assert main(["verify", str(run / "checkpoint-6"), "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["files"] == len(trainer_files(run / "checkpoint-6"))
    assert main(["inspect", str(run / "checkpoint-6"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["needs_trust"] == ["rng_state.pth", "training_args.bin"]

    os.truncate(run / "checkpoint-6" / "optimizer.pt", 100)
    unsealed = Path(shutil.copytree(run / "checkpoint-4", run / "checkpoint-10"))
    (unsealed / FILESET_NAME).unlink()
    assert main(["verify", str(run), "--json"]) == 1  # the output_dir: every checkpoint-N, in step order
    results = json.loads(capsys.readouterr().out)
    assert [Path(r["path"]).name for r in results] == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-10"]
    assert [r["ok"] for r in results] == [True, True, False, False]
    assert results[2]["damaged"] == ["optimizer.pt"]
    assert FILESET_NAME in results[3]["error"]
    assert main(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "optimizer.pt" in out and "2 of 4 verified" in out


def test_the_callback_warns_when_it_finds_no_checkpoint_to_seal(tmp_path: Path) -> None:
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.warns(RuntimeWarning, match="checkpoint-3"):
        TorchkeepCallback().on_save(args, TrainerState(global_step=3), TrainerControl())
    assert list(tmp_path.iterdir()) == []


def test_import_torchkeep_does_not_import_transformers() -> None:
    code = textwrap.dedent(
        """
        import sys
        import torchkeep, torchkeep.integrations, torchkeep.formats.fileset
        torchkeep.load, torchkeep.verify, torchkeep.inspect
        print(sorted(name for name in sys.modules if name.split(".")[0] in ("transformers", "accelerate")))
        """
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert child.returncode == 0 and child.stdout.strip() == "[]", child.stdout + child.stderr[-3000:]
