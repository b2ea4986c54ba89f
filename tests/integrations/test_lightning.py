"""TorchkeepCheckpointIO under a real Lightning Trainer: top-k, exact resume after SIGKILL, async, damage, hparams."""

from __future__ import annotations

import argparse
import copy
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import torchkeep
import torchkeep.integrations.lightning as tk_lightning
from tests.conftest import assert_same
from tests.integrations import lightning_script as script
from torchkeep.integrations.lightning import TorchkeepCheckpointIO

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    *(pytest.mark.filterwarnings(spec) for spec in script.LIGHTNING_WARNINGS),
    # Resuming into the folder of the run it resumes: Lightning says the folder is not empty.
    pytest.mark.filterwarnings(r"ignore:Checkpoint directory .* exists and is not empty:UserWarning"),
]


class Spy(TorchkeepCheckpointIO):
    """The plugin, recording what Lightning asked of it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.saved: dict[str, dict[str, Any]] = {}  # path -> a deep copy of the dict at the call
        self.removed: list[str] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.saved[str(path)] = copy.deepcopy(checkpoint)
        super().save_checkpoint(checkpoint, path, storage_options)

    def remove_checkpoint(self, path: Any) -> None:
        self.removed.append(str(path))
        super().remove_checkpoint(path)


class StartStep(Callback):
    """Remembers the global step a fit starts from."""

    step: int | None = None

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.step = trainer.global_step


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_equal_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def resume(directory: Path, plugin: TorchkeepCheckpointIO | None = None, ckpt_path: str = "last") -> tuple[Any, int]:
    """Fit the script's model to the end from ``ckpt_path``; its final weights and the step it started from."""
    torch.manual_seed(0)
    model = script.Regressor()
    start = StartStep()
    trainer = script.trainer(directory, plugin or TorchkeepCheckpointIO(), start)
    train, val = script.loaders()
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    assert start.step is not None
    return weights(model), start.step


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Spy, dict[str, torch.Tensor]]:
    """One uninterrupted run through the plugin: its folder, the plugin's record, the final weights."""
    directory = tmp_path_factory.mktemp("reference")
    spy = Spy()
    model = script.run(directory, plugin=spy)
    return directory, spy, weights(model)


def test_topk_checkpoints_are_torchkeep_directories_and_drop_through_remove_checkpoint(
    reference: tuple[Path, Spy, dict[str, torch.Tensor]],
) -> None:
    directory, spy, _ = reference
    kept = sorted(os.listdir(directory))
    # val_loss falls every epoch, so each of epochs 2 and 3 pushed the worst of the top 2 out.
    assert kept == ["epoch=2-step=15.ckpt", "epoch=3-step=20.ckpt", "last.ckpt"]
    assert sorted(Path(p).name for p in spy.removed) == ["epoch=0-step=5.ckpt", "epoch=1-step=10.ckpt"]
    assert {Path(p).name for p in spy.saved} == {*kept, "epoch=0-step=5.ckpt", "epoch=1-step=10.ckpt"}
    for name in kept:
        path = directory / name
        assert (path / "manifest.json").is_file()  # a native checkpoint directory under Lightning's name
        report = torchkeep.verify(path)
        assert report.format == "torchkeep" and report.method == "xxh3-64" and report.tensors > 0
        assert torchkeep.inspect(path).metadata["lightning"]["global_step"] == spy.saved[str(path)]["global_step"]


def test_lightning_checkpoint_dict_round_trips(reference: tuple[Path, Spy, dict[str, torch.Tensor]]) -> None:
    directory, spy, _ = reference
    plugin = TorchkeepCheckpointIO()
    for name in ("last.ckpt", "epoch=2-step=15.ckpt"):
        saved = spy.saved[str(directory / name)]
        assert {"loops", "callbacks", "optimizer_states", "lr_schedulers", "hyper_parameters"} <= set(saved)
        assert_same(plugin.load_checkpoint(directory / name), saved)


def test_validate_with_a_checkpoint_path_reads_it_through_the_plugin(
    reference: tuple[Path, Spy, dict[str, torch.Tensor]],
) -> None:
    directory, _, _ = reference
    path = directory / "epoch=2-step=15.ckpt"
    torch.manual_seed(1)  # weights other than the checkpoint's
    model = script.Regressor()
    _, val = script.loaders()
    script.trainer(directory, TorchkeepCheckpointIO()).validate(model, val, ckpt_path=str(path), verbose=False)
    saved = torchkeep.load(path)["state_dict"]
    assert_equal_weights(weights(model), {k: saved[k] for k in weights(model)})


def test_sigkill_mid_training_then_fit_last_resumes_to_the_same_weights(
    tmp_path: Path, reference: tuple[Path, Spy, dict[str, torch.Tensor]]
) -> None:
    killed = subprocess.run(
        [sys.executable, "-m", "tests.integrations.lightning_script", str(tmp_path), "--kill-at", "12"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "finished" not in killed.stdout
    # Killed in epoch 2: the checkpoints of epochs 0 and 1 are there, whole, and nothing else.
    assert sorted(os.listdir(tmp_path)) == ["epoch=0-step=5.ckpt", "epoch=1-step=10.ckpt", "last.ckpt"]
    assert torchkeep.load(tmp_path / "last.ckpt")["global_step"] == 10

    final, start = resume(tmp_path)
    assert start == 10
    assert_equal_weights(final, reference[2])


def test_plain_lightning_ckpt_loads_and_resumes_through_the_plugin(
    tmp_path: Path, reference: tuple[Path, Spy, dict[str, torch.Tensor]]
) -> None:
    torch.manual_seed(0)
    plain = script.trainer(tmp_path, None, max_epochs=2)  # Lightning's own torch.save files
    plain.fit(script.Regressor(), *script.loaders())
    last = tmp_path / "last.ckpt"
    assert last.is_file()

    loaded = TorchkeepCheckpointIO().load_checkpoint(last)
    assert_same(loaded, torch.load(last, weights_only=True))

    # Resume from it: later checkpoints, last.ckpt included, are written as torchkeep directories.
    final, start = resume(tmp_path, ckpt_path=str(last))
    assert start == 10
    assert_equal_weights(final, reference[2])
    assert (last / "manifest.json").is_file()


def test_damaged_newest_checkpoint_is_a_typed_error_naming_it(tmp_path: Path) -> None:
    script.run(tmp_path, max_epochs=1)
    last = tmp_path / "last.ckpt"
    (shard,) = last.glob("data-*.safetensors")
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor's bytes
    shard.write_bytes(bytes(data))

    with pytest.raises(torchkeep.ChecksumMismatchError) as caught:
        resume(tmp_path)
    assert caught.value.path == str(last)
    assert str(last) in str(caught.value)


def test_async_save_lets_training_run_on_and_keeps_the_state_at_the_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = tk_lightning.write_job
    writing = threading.Event()
    trained_on = threading.Event()
    held: list[bool] = []

    def gated_write(job: Any) -> Any:
        if not held:  # the first save is held until training has gone two steps further
            writing.set()
            held.append(trained_on.wait(timeout=60))
        return real_write(job)

    monkeypatch.setattr(tk_lightning, "write_job", gated_write)

    class TwoStepsLater(Callback):
        after: dict[str, torch.Tensor] | None = None

        def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
            if trainer.global_step == 5:
                assert writing.is_set()  # the save of step 3 is writing in the background
                self.after = weights(module)
                trained_on.set()

        def on_exception(self, *args: Any) -> None:
            trained_on.set()  # a failed fit does not wait for the gate

    later = TwoStepsLater()
    folder = tmp_path / "checkpoints"
    spy = Spy(async_save=True, compression="zstd")
    trainer = L.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        # save_last="link": Lightning links last.ckpt to a checkpoint whose folder the background save
        # has not made yet.
        callbacks=[ModelCheckpoint(dirpath=folder, every_n_train_steps=3, save_top_k=-1, save_last="link"), later],
        plugins=[spy],
    )
    torch.manual_seed(0)
    trainer.fit(script.Regressor(), *script.loaders())

    assert held == [True]  # training reached step 5 while the step-3 save was still unwritten
    first = folder / "epoch=0-step=3.ckpt"
    at_call = spy.saved[str(first)]
    assert later.after is not None
    assert not torch.equal(at_call["state_dict"]["net.0.weight"], later.after["net.0.weight"])
    torchkeep.verify(first)
    assert torchkeep.inspect(first).format_version == 2  # compressed
    assert_same(TorchkeepCheckpointIO().load_checkpoint(first), at_call)
    assert sorted(os.listdir(folder)) == ["epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt", "last.ckpt"]
    assert os.readlink(folder / "last.ckpt") == "epoch=1-step=6.ckpt"
    assert_same(
        TorchkeepCheckpointIO().load_checkpoint(folder / "last.ckpt"), spy.saved[str(folder / "epoch=1-step=6.ckpt")]
    )


def test_async_removal_waits_for_the_save_before_it_and_is_skipped_if_that_save_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin = TorchkeepCheckpointIO(async_save=True)
    older, newer = tmp_path / "epoch=0-step=5.ckpt", tmp_path / "epoch=1-step=10.ckpt"
    oldest = tmp_path / "last.ckpt"
    plugin.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 0}, oldest)
    plugin.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 5}, older)

    def full_disk(job: Any) -> None:
        raise torchkeep.StorageError(f"Could not save {job.key!r}: the disk is full.", path=job.key)

    monkeypatch.setattr(tk_lightning, "write_job", full_disk)
    plugin.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 10}, newer)
    plugin.remove_checkpoint(older)  # what ModelCheckpoint does right after a save
    plugin.remove_checkpoint(oldest)
    with pytest.raises(torchkeep.StorageError, match="disk is full"):
        plugin.teardown()
    assert not newer.exists()
    assert torch.equal(torchkeep.load(older)["state_dict"]["w"], torch.zeros(3))  # kept: its successor failed
    assert oldest.is_dir()

    monkeypatch.undo()
    plugin.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 10}, newer)
    plugin.remove_checkpoint(older)
    plugin.remove_checkpoint(oldest)
    plugin.teardown()
    assert sorted(os.listdir(tmp_path)) == [newer.name]


def test_what_is_not_a_checkpoint_is_never_replaced(tmp_path: Path) -> None:
    plugin = TorchkeepCheckpointIO()
    state = {"state_dict": {"w": torch.ones(2)}}
    (tmp_path / "notes.ckpt").mkdir()
    (tmp_path / "notes.ckpt" / "todo.txt").write_text("keep me")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    for name in ("notes.ckpt", "text.ckpt"):
        with pytest.raises(torchkeep.CheckpointExistsError) as caught:
            plugin.save_checkpoint(state, tmp_path / name)
        assert caught.value.path == str(tmp_path / name) and "ModelCheckpoint" in str(caught.value)
    assert (tmp_path / "notes.ckpt" / "todo.txt").read_text() == "keep me"
    assert (tmp_path / "text.ckpt").read_text() == "not a checkpoint"
    with pytest.raises(torchkeep.InvalidArgumentError, match="storage_options"):
        plugin.save_checkpoint(state, tmp_path / "a.ckpt", storage_options={"compression": "zstd"})


class Config:
    """A user's own class, which no tree holds without pickle."""

    def __init__(self, width: int) -> None:
        self.width = width


class WithNamespace(script.Regressor):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(width=args.width)
        self.save_hyperparameters()


class WithConfig(script.Regressor):
    def __init__(self, config: Config) -> None:
        super().__init__(width=config.width)
        self.save_hyperparameters()


def test_namespace_hyperparameters_round_trip_and_a_user_class_is_refused_by_name(tmp_path: Path) -> None:
    args = argparse.Namespace(width=8, name="run-1", nested=argparse.Namespace(depth=2))
    trainer = script.trainer(tmp_path / "ns", TorchkeepCheckpointIO(), max_epochs=1)
    trainer.fit(WithNamespace(args), *script.loaders())
    loaded = TorchkeepCheckpointIO().load_checkpoint(tmp_path / "ns" / "last.ckpt")
    assert type(loaded["hyper_parameters"]["args"]) is argparse.Namespace
    assert loaded["hyper_parameters"]["args"] == args
    # Lightning's AttributeDict (what self.hparams is) comes back as one too.
    hparams = AttributeDict(lr=0.1, args=args)
    TorchkeepCheckpointIO().save_checkpoint({"hparams": hparams}, tmp_path / "hp.ckpt")
    back = TorchkeepCheckpointIO().load_checkpoint(tmp_path / "hp.ckpt")["hparams"]
    assert type(back) is AttributeDict and back == hparams and type(back.args) is argparse.Namespace

    trainer = script.trainer(tmp_path / "cfg", TorchkeepCheckpointIO(), max_epochs=1)
    with pytest.raises(torchkeep.UnsupportedObjectError) as caught:
        trainer.fit(WithConfig(Config(width=8)), *script.loaders())
    err = caught.value
    assert err.key == 'checkpoint["hyper_parameters"]["config"]'
    assert "test_lightning.Config" in str(err)
    assert "save_hyperparameters(ignore=['config'])" in str(err) and "register_type" in str(err)
    assert str(tmp_path / "cfg") in str(err)
    assert not (tmp_path / "cfg").exists() or os.listdir(tmp_path / "cfg") == []  # nothing was written

    class Tracker(Callback):
        def state_dict(self) -> dict[str, Any]:
            return {"config": Config(width=8)}

    with pytest.raises(torchkeep.UnsupportedObjectError) as caught:
        TorchkeepCheckpointIO().save_checkpoint({"callbacks": {"Tracker": Tracker().state_dict()}}, tmp_path / "x.ckpt")
    assert caught.value.key == 'checkpoint["callbacks"]["Tracker"]["config"]'
    assert "on_save_checkpoint()" in str(caught.value) and "callback" in str(caught.value)
    assert not (tmp_path / "x.ckpt").exists()


def test_plain_ckpt_with_pickled_objects_needs_trust(tmp_path: Path) -> None:
    path = tmp_path / "plain.ckpt"
    namespace = argparse.Namespace(width=8)
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"args": namespace}}, path)

    with pytest.raises(torchkeep.UnsafeCheckpointError) as caught:
        TorchkeepCheckpointIO().load_checkpoint(path)
    assert caught.value.path == str(path)
    assert "argparse.Namespace" in str(caught.value) and "TorchkeepCheckpointIO(trust=True)" in str(caught.value)

    with pytest.warns(UserWarning, match="full unpickling"):
        loaded = TorchkeepCheckpointIO(trust=True).load_checkpoint(path)
    assert loaded["hyper_parameters"]["args"] == namespace


LAZY_IMPORT = """
import sys

class Refuse:  # any attempt to import Lightning fails loudly
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric"):
            raise ImportError("imported " + name)

sys.meta_path.insert(0, Refuse())
import torch, torchkeep, torchkeep.integrations
torchkeep.save({"w": torch.ones(2)}, "memory://lazy/ckpt")
assert torch.equal(torchkeep.load("memory://lazy/ckpt")["w"], torch.ones(2))
try:
    import torchkeep.integrations.lightning
except ImportError as err:
    print(err)
"""


def test_import_torchkeep_does_not_import_lightning() -> None:
    done = subprocess.run([sys.executable, "-c", LAZY_IMPORT], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    # Only the integration itself reached for Lightning, and saying what to install.
    assert (
        done.stdout.strip()
        == "torchkeep.integrations.lightning needs the lightning package: pip install 'torchkeep[lightning]'."
    )
