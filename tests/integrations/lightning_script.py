"""A small Lightning training run checkpointed through TorchkeepCheckpointIO, for the integration tests.

    python -m tests.integrations.lightning_script DIR [--kill-at STEP]

With ``--kill-at`` the process SIGKILLs itself when the training reaches that
global step, as a preempted machine would stop it; the tests resume in their
own process with :func:`run` (``resume=True``).
"""

from __future__ import annotations

import argparse
import builtins
import os
import signal
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchkeep.integrations.lightning import TorchkeepCheckpointIO

# Lightning 2.6 with torch 2.13 warns about torch's pytree API for every loader; nothing to do with the test.
LIGHTNING_WARNINGS = [
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning",
    r"ignore:.*does not have many workers:UserWarning",
]

MAX_EPOCHS = 4
STEPS_PER_EPOCH = 5


class Regressor(L.LightningModule):
    """A two-layer regressor trained with AdamW and a per-epoch StepLR."""

    def __init__(self, lr: float = 0.05, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)]


class KillAt(Callback):
    """SIGKILL this process once training has reached ``step`` global steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def loaders() -> tuple[DataLoader[Any], DataLoader[Any]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS_PER_EPOCH * 8 + 16, 6, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(len(x), 1, generator=g)
    train = TensorDataset(x[:-16], y[:-16])
    val = TensorDataset(x[-16:], y[-16:])
    return DataLoader(train, batch_size=8), DataLoader(val, batch_size=8)


def trainer(
    directory: Path, plugin: TorchkeepCheckpointIO | None, *callbacks: Callback, max_epochs: int = MAX_EPOCHS
) -> L.Trainer:
    """The run's Trainer; ``plugin=None`` leaves Lightning's own torch.save checkpoints."""
    checkpoint = ModelCheckpoint(dirpath=directory, monitor="val_loss", save_top_k=2, save_last=True)
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[checkpoint, *callbacks],
        plugins=[plugin] if plugin is not None else [],
    )


def run(
    directory: Path,
    *,
    kill_at: int | None = None,
    resume: bool = False,
    plugin: TorchkeepCheckpointIO | None = None,
    max_epochs: int = MAX_EPOCHS,
) -> Regressor:
    """Train (or resume) the regressor, checkpointing into ``directory``; return the trained module."""
    torch.manual_seed(0)
    model = Regressor()
    extra = [KillAt(kill_at)] if kill_at is not None else []
    fit = trainer(directory, plugin or TorchkeepCheckpointIO(), *extra, max_epochs=max_epochs)
    train, val = loaders()
    fit.fit(model, train, val, ckpt_path="last" if resume else None)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory", type=Path)
    parser.add_argument("--kill-at", type=int, default=None)
    args = parser.parse_args()
    for spec in LIGHTNING_WARNINGS:
        action, message, category = spec.split(":", 2)
        warnings.filterwarnings(action, message=message, category=getattr(builtins, category))
    run(args.directory, kill_at=args.kill_at)
    print("finished", flush=True)


if __name__ == "__main__":
    main()
