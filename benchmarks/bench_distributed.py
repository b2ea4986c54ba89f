"""Sharded (FSDP2) save and restore on 2 CPU ranks: torchkeep's CheckpointManager against plain DCP.

Both go through torch.distributed.checkpoint with the same state (a model of a
few Linear layers sharded with ``fully_shard``, and its AdamW moments):

* torchkeep: ``CheckpointManager.save`` (every piece checksummed, the manifest
  written by rank 0, the commit after every rank's results) and ``restore``
  (every piece verified, resharded by DCP);
* DCP: ``dcp.save`` with its ``FileSystemWriter`` (fsync'd files, pickled
  ``.metadata``) and ``dcp.load`` with its ``FileSystemReader``, around the
  same ``get_state_dict`` / ``set_state_dict`` calls.

Cases interleaved in each round; each time is rank 0's, between barriers; the
median over ``--repeat`` rounds and its ratio to DCP are printed.

    python benchmarks/bench_distributed.py [--mib 192] [--repeat 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

SAVE_PEER = "save: dcp.save (FileSystemWriter)"
LOAD_PEER = "restore: dcp.load (FileSystemReader)"


def build(world: int, width: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(4)])
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()  # the moments exist
    optimizer.zero_grad()
    return model, optimizer


def timed(fn: Any) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def rank_main(rank: int, world: int, rendezvous: str, folder: str, width: int, repeat: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import torchkeep

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))  # fmt: skip
    model, optimizer = build(world, width)
    manager = torchkeep.CheckpointManager(f"{folder}/tk", keep_last=1)
    times: dict[str, list[float]] = {}

    def dcp_save(step: int) -> None:
        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optimizer": osd}, storage_writer=dcp.FileSystemWriter(f"{folder}/dcp-{step}"))

    def dcp_load(step: int) -> None:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optimizer": osd}
        dcp.load(state, storage_reader=dcp.FileSystemReader(f"{folder}/dcp-{step}"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    for step in range(1, repeat + 1):
        cases = {
            "save: torchkeep CheckpointManager.save": lambda step=step: manager.save(
                step, model=model, optimizer=optimizer
            ),
            "save: dcp.save (FileSystemWriter)": lambda step=step: dcp_save(step),
            "restore: torchkeep CheckpointManager.restore": lambda: manager.restore(model=model, optimizer=optimizer),
            "restore: dcp.load (FileSystemReader)": lambda step=step: dcp_load(step),
        }
        for name, fn in cases.items():
            times.setdefault(name, []).append(timed(fn))
        if rank == 0:
            shutil.rmtree(f"{folder}/dcp-{step}", ignore_errors=True)
        dist.barrier()
    manager.close()
    if rank == 0:
        mib = sum(p.numel() * p.element_size() for p in model.parameters()) * 3 / 2**20  # weights and two moments
        print(f"{world} ranks, {mib:.0f} MiB of sharded state (weights + AdamW moments), {repeat} rounds")
        medians = {name: statistics.median(v) for name, v in times.items()}
        for name, values in times.items():
            peer = (
                "save: dcp.save (FileSystemWriter)"
                if name.startswith("save")
                else "restore: dcp.load (FileSystemReader)"
            )
            runs = " ".join(f"{v:.2f}" for v in values)
            print(f"  {name:<48} median {medians[name]:.3f} s  {medians[name] / medians[peer]:.2f}x DCP   runs {runs}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=192, help="about this many MiB of state in all")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    width = int((args.mib * 2**20 / 3 / 4 / 4) ** 0.5)  # 4 square layers of float32, three copies
    folder = tempfile.mkdtemp(prefix="tk-bench-dist-")
    try:
        mp.start_processes(rank_main, args=(args.world, f"{folder}/rendezvous", folder, width, args.repeat),
                           nprocs=args.world, start_method="spawn")  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
