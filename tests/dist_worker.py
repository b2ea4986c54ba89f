"""Ranks of a torch.distributed job on the CPU (gloo), started by the tests of tests/test_distributed.py.

``run(world, fn, *args)`` starts ``world`` processes with a file rendezvous
(gloo's own connections bound to the loopback interface) and runs
``fn(rank, world, *args)`` in each; every function here is such a rank body.
Results come back as files in the test's folder.
"""

from __future__ import annotations

import datetime
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import torchkeep

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def _rank_main(rank: int, fn: Callable[..., None], world: int, rendezvous: str, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run(world: int, fn: Callable[..., None], folder: Path, *args: Any, killed: tuple[int, ...] = ()) -> None:
    """Run ``fn`` on ``world`` gloo ranks and wait for every one of them (none is stopped early).

    Raises if a rank failed, or if a rank in ``killed`` was not killed by SIGKILL.
    """
    import signal

    import torch.multiprocessing as mp

    rendezvous = str(folder / f"rendezvous-{uuid.uuid4().hex[:8]}")
    context = mp.start_processes(_rank_main, args=(fn, world, rendezvous, args), nprocs=world, join=False,
                                 start_method="spawn")  # fmt: skip
    for process in context.processes:
        process.join(300)
    codes = [process.exitcode for process in context.processes]
    for process in context.processes:
        if process.exitcode is None:
            process.kill()
    expected = [-signal.SIGKILL if rank in killed else 0 for rank in range(world)]
    assert codes == expected, f"exit codes of the ranks: {codes}, expected {expected}"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(16, 32)
        self.l2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x)))


def sharded_net(world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The same Net on every rank (seeded), sharded with FSDP2 over a CPU mesh, and AdamW."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Net()
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model.l1, mesh=mesh)
    fully_shard(model.l2, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, rank: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed + rank)
    for _ in range(steps):
        loss = model(torch.randn(4, 16, generator=g)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer as whole tensors (a collective when sharded), keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    msd, osd = get_state_dict(model, optimizer, options=options)
    return {"model": {k: v.clone() for k, v in msd.items()}, "optimizer": osd}


# -- rank bodies ------------------------------------------------------------------------------


def fsdp_save(rank: int, world: int, folder: str, out: str | None = None) -> None:
    """Three steps of FSDP2 training, saved at step 3 into ``folder``; the whole state goes to ``out``."""
    model, optimizer = sharded_net(world)
    train(model, optimizer, 3, rank)
    manager = torchkeep.CheckpointManager(f"{folder}/ckpt", keep_last=2)
    manager.save(3, model=model, optimizer=optimizer)
    expected = full_state(model, optimizer)
    if rank == 0:
        torch.save(expected, f"{out or folder}/expected.pt")
    manager.close()


def fsdp_restore(rank: int, world: int, folder: str) -> None:
    import warnings

    model, optimizer = sharded_net(world)
    manager = torchkeep.CheckpointManager(f"{folder}/ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = manager.restore(model=model, optimizer=optimizer)
    _note(folder, rank, warned=[str(w.message) for w in caught])
    assert record is not None and record.step == 3
    got = full_state(model, optimizer)
    if rank == 0:
        torch.save(got, f"{folder}/restored-{world}.pt")


def fsdp_async(rank: int, world: int, folder: str) -> None:
    """An asynchronous save whose writing is held back until training has changed every weight."""
    import threading

    from torchkeep import distributed

    released = threading.Event()
    write = distributed.KeepWriter.write_data

    def held_write(self: Any, plan: Any, planner: Any) -> Any:
        assert released.wait(60)
        return write(self, plan, planner)

    distributed.KeepWriter.write_data = held_write  # type: ignore[method-assign]
    model, optimizer = sharded_net(world)
    train(model, optimizer, 2, rank)
    with torchkeep.CheckpointManager(f"{folder}/ckpt", async_save=True) as manager:
        handle = manager.save(2, model=model, optimizer=optimizer)
        at_save = full_state(model, optimizer)
        train(model, optimizer, 3, rank, seed=7)  # training goes on while the save waits to be written
        released.set()
        record = handle.wait()
        assert isinstance(handle, torchkeep.SaveHandle) and record.step == 2
        after = full_state(model, optimizer)
    if rank == 0:
        torch.save({"at_save": at_save, "after": after}, f"{folder}/async.pt")


def _note(folder: str, rank: int, **values: Any) -> None:
    import json

    Path(folder, f"rank-{rank}.json").write_text(json.dumps(values))


def _attempt(folder: str, rank: int, call: Callable[[], Any]) -> None:
    """Run ``call`` and note what it raised (type, message) and how long it took, or that it raised nothing."""
    import time

    started = time.monotonic()
    try:
        call()
    except Exception as err:
        _note(folder, rank, error=type(err).__name__, message=str(err), seconds=time.monotonic() - started)
    else:
        _note(folder, rank, error=None, seconds=time.monotonic() - started)


def sharded_options_refused(rank: int, world: int, folder: str) -> None:
    """compression= with sharded state is refused on every rank before anything is gathered or written."""
    model, optimizer = sharded_net(world)
    manager = torchkeep.CheckpointManager(f"{folder}/ckpt", compression="zstd")
    refused = []
    try:
        manager.save(1, model=model, optimizer=optimizer)
    except torchkeep.InvalidArgumentError as err:
        refused.append(str(err))
    manager.close()
    for bad in ({"directory": "memory://run/ckpt"}, {"directory": f"{folder}/x", "process_group": "nope"}):
        try:
            torchkeep.CheckpointManager(**bad)  # type: ignore[arg-type]
        except torchkeep.InvalidArgumentError as err:
            refused.append(str(err))
    _note(folder, rank, refused=refused)


def failing_save(rank: int, world: int, folder: str, how: str, sharded: bool) -> None:
    """Step 1 saves; in the save of step 2 one rank dies (SIGKILL), raises, or hangs past the timeout.

    Sharded, rank 1 fails while DCP writes its part; replicated (DDP), rank 1 dies or hangs as the
    ranks' own states are gathered, or rank 0's write raises.
    """
    import signal
    import time

    from torchkeep import distributed
    from torchkeep import manager as manager_module

    if sharded:
        model, optimizer = sharded_net(world)
        state: dict[str, Any] = {"model": model, "optimizer": optimizer}
    else:
        torch.manual_seed(0)
        state = {"model": Net()}
    manager = torchkeep.CheckpointManager(f"{folder}/ckpt", timeout=4)
    manager.save(1, **state)

    def fail(*args: Any, **kwargs: Any) -> Any:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "hang":
            time.sleep(12)
        raise OSError(28, "No space left on device (injected)")

    failing = 0 if how == "raise" and not sharded else 1
    if rank == failing:
        if sharded:
            distributed.KeepWriter.write_data = fail  # type: ignore[method-assign]
        elif how == "raise":
            manager_module.write_job = fail  # type: ignore[assignment]
        else:
            distributed.Group.gather = fail  # type: ignore[method-assign]
    _attempt(folder, rank, lambda: manager.save(2, **state))
    if how == "hang" and rank == 0:
        time.sleep(9)  # the hung rank wakes to find its peers gone before the job ends


def ddp_training(rank: int, world: int, folder: str, steps: int, kill_at: int, async_save: bool) -> None:
    """DDP with a per-rank sampler and per-rank noise, checkpointed every 3 steps; every rank dies at kill_at."""
    import signal

    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(5)
    data = TensorDataset(torch.randn(96, 16, generator=g), torch.randn(96, 8, generator=g))
    torch.manual_seed(0)
    model = DistributedDataParallel(Net())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sampler = torchkeep.ResumableSampler(len(data), seed=3)
    loader = DataLoader(data, batch_size=4, sampler=sampler, generator=torch.Generator())
    torch.manual_seed(100 + rank)  # each rank's own noise stream, saved and restored per rank
    manager = torchkeep.CheckpointManager(f"{folder}/ckpt", keep_last=2, save_every=3, async_save=async_save)
    record = manager.restore(model=model, optimizer=optimizer, data=sampler)
    step = 0 if record is None else record.step
    while step < steps:
        for x, y in loader:
            x = x + 0.1 * torch.randn_like(x)
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if manager.should_save(step):
                manager.save(step, model=model, optimizer=optimizer, data=sampler)
            if step == kill_at:
                manager.wait()
                os.kill(os.getpid(), signal.SIGKILL)
            if step == steps:
                break
    manager.close()
    fingerprint = torch.cat([p.detach().reshape(-1) for p in model.parameters()] + [torch.rand(4)])
    torch.save(fingerprint, f"{folder}/fingerprint-{rank}.pt")
    if rank == 1:
        _note(folder, rank, locked=manager._held.lock is not None, steps=[r.step for r in manager.list()])


def fsdp_restore_damaged(rank: int, world: int, folder: str) -> None:
    """Restore from a checkpoint with a damaged piece: every rank must refuse it alike."""
    model, optimizer = sharded_net(world)
    _attempt(
        folder, rank, lambda: torchkeep.CheckpointManager(f"{folder}/ckpt").restore(model=model, optimizer=optimizer)
    )


def subgroup_save(rank: int, world: int, folder: str) -> None:
    """Ranks 0 and 1 of 3 checkpoint on their own group; rank 2 takes no part (and builds no manager)."""
    sub = dist.new_group([0, 1])  # made by every rank, as torch wants
    if rank == 2:
        try:
            torchkeep.CheckpointManager(f"{folder}/ckpt", process_group=sub)
        except torchkeep.InvalidArgumentError as err:
            _note(folder, rank, refused=str(err))
    if rank < 2:
        torch.manual_seed(0)
        with torchkeep.CheckpointManager(f"{folder}/ckpt", process_group=sub, timeout=30) as manager:
            manager.save(1, model=Net())
            _note(folder, rank, steps=[r.step for r in manager.list()])


def preempted_rank(rank: int, world: int, folder: str) -> None:
    """Rank 1 alone gets SIGUSR1 at step 3: every rank saves step 3, then every rank exits with status 0."""
    import signal

    torch.manual_seed(0)
    model = Net()
    manager = torchkeep.CheckpointManager(f"{folder}/ckpt", install_signal_handler=True, save_every=100)
    for step in range(1, 10):
        if step == 3 and rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        if manager.should_save(step):
            _note(folder, rank, saving=step)
            manager.save(step, model=model)
    _note(folder, rank, saving=None)


def disagreeing_save(rank: int, world: int, folder: str, how: str) -> None:
    """The ranks pass different steps, or rank 0 fails before any collective (another manager holds the lock)."""

    torch.manual_seed(0)
    manager = torchkeep.CheckpointManager(f"{folder}/ckpt", timeout=20)
    if how == "locked" and rank == 0:
        blocker = torchkeep.CheckpointManager(f"{folder}/ckpt", process_group=False)
        blocker.save(0, model=Net())
    _attempt(folder, rank, lambda: manager.save(5 + rank if how == "steps" else 5, model=Net()))


def failing_restore(rank: int, world: int, folder: str) -> None:
    """Rank 0's restore fails before any collective (its listing raises): every rank raises at once."""

    torch.manual_seed(0)
    manager = torchkeep.CheckpointManager(f"{folder}/ckpt", timeout=20)
    manager.save(1, model=Net())
    if rank == 0:

        def broken() -> Any:
            raise torchkeep.StorageError("listing failed (injected)")

        manager.list = broken  # type: ignore[method-assign]
    _attempt(folder, rank, lambda: manager.restore(model=Net()))


def mismatched_restore(rank: int, world: int, folder: str) -> None:
    """Rank 0 restores model and optimizer, rank 1 the model only: both refuse, nothing is touched."""
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = torchkeep.CheckpointManager(f"{folder}/ckpt", timeout=20)
    manager.save(1, model=model, optimizer=optimizer)
    asked = {"model": model, "optimizer": optimizer} if rank == 0 else {"model": model}
    _attempt(folder, rank, lambda: manager.restore(**asked))
