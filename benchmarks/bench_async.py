"""How long does saving block training? ~1 GiB model + AdamW state (~3 GiB in all).

Measures, each case in a fresh process, side by side in one run:
- the floor: one ``copy_`` of the whole state into preallocated buffers, timed in
  the same process right before each async save;
- torchkeep async (``CheckpointManager(async_save=True)``): time ``save`` blocks,
  first call (allocates the staging buffer) and the next ones (reuse it);
- torchkeep sync, ``torch.save`` + fsync, and
  ``torch.distributed.checkpoint.async_save`` (one process, gloo on loopback);
- RSS after each of N consecutive async saves (no growth beyond the staging buffer).

    python benchmarks/bench_async.py [--layers N] [--saves N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import GiB, MiB, fsync_path, status

CASES = ["torchkeep async", "torchkeep sync", "torch.save+fsync", "dcp.async_save"]
FLOOR = "floor: copy_ into buffers"


def build(layers: int, device: str) -> tuple[Any, Any]:
    import torch

    from benchmarks.bench_load_into import build_model

    model = build_model(layers, meta=True).to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
            p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    optimizer.step()  # creates exp_avg and exp_avg_sq: twice the model again
    return model, optimizer


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run(case: str, base: str, layers: int, saves: int, device: str) -> dict[str, Any]:
    import torch

    import torchkeep

    model, optimizer = build(layers, device)
    tensors = list(model.state_dict().values()) + [
        v for s in optimizer.state_dict()["state"].values() for v in s.values() if isinstance(v, torch.Tensor)
    ]
    size = sum(t.numel() * t.element_size() for t in tensors)
    stalls: list[float] = []
    floor: list[float] = []
    rss: list[int] = []
    total: list[float] = []
    if case in ("torchkeep async", "torchkeep sync"):
        is_async = case == "torchkeep async"
        n = saves if is_async else 3
        pin = device == "cuda"
        # The floor is measured in the same process, just before each save: machine noise hits both alike.
        buffers = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in tensors] if is_async else []
        with torchkeep.CheckpointManager(f"{base}/{case.replace(' ', '-')}", keep_last=1, async_save=is_async) as mgr:
            for step in range(1, n + 1):
                if buffers:
                    sync(device)
                    start = time.perf_counter()
                    for dst, src in zip(buffers, tensors, strict=True):
                        dst.copy_(src, non_blocking=pin)
                    sync(device)
                    floor.append(time.perf_counter() - start)
                sync(device)
                start = time.perf_counter()
                handle = mgr.save(step, model=model, optimizer=optimizer)
                stalls.append(time.perf_counter() - start)
                if is_async:
                    handle.wait()
                total.append(time.perf_counter() - start)
                rss.append(status()["VmRSS"])
    elif case == "torch.save+fsync":
        for _ in range(3):
            sync(device)
            start = time.perf_counter()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, f"{base}/t.pth")
            fsync_path(f"{base}/t.pth")
            stalls.append(time.perf_counter() - start)
    elif case == "dcp.async_save":
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        backend = "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend, init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)
        for i in range(3):
            sync(device)
            start = time.perf_counter()
            future = dcp.async_save(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint_id=f"{base}/dcp{i}"
            )
            stalls.append(time.perf_counter() - start)
            future.result()
            total.append(time.perf_counter() - start)
            shutil.rmtree(f"{base}/dcp{i}", ignore_errors=True)
        dist.destroy_process_group()
    return {"size": size, "stalls": stalls, "total": total, "rss": rss, "floor": floor}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--saves", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run(args.child, args.dir, args.layers, args.saves, args.device)))
        return
    base = args.dir or tempfile.mkdtemp(prefix="tk-bench-", dir=Path(__file__).resolve().parents[1])
    os.makedirs(base, exist_ok=True)
    results = {}
    try:
        for case in CASES:
            cmd = [sys.executable, __file__, "--child", case, "--dir", base, "--layers", str(args.layers),
                   "--saves", str(args.saves), "--device", args.device]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"{case}: failed\n{out.stderr[-2000:]}")
                continue
            results[case] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    size = next(iter(results.values()))["size"]
    if "torchkeep async" in results:
        results = {FLOOR: {**results["torchkeep async"], "stalls": results["torchkeep async"]["floor"], "total": []},
                   **results}  # fmt: skip
    print(f"state: {size / GiB:.2f} GiB (model + AdamW) on {args.device}; {os.cpu_count()} cores")
    print()
    steady: dict[str, float] = {}
    print(f"{'case':<28}{'first s':>9}{'steady s':>10}{'vs sync':>9}{'vs floor':>10}{'until committed s':>19}")
    for case, r in results.items():
        first = r["stalls"][0]
        steady[case] = statistics.median(r["stalls"][1:]) if len(r["stalls"]) > 1 else first
    for case, r in results.items():
        sync_ref = steady.get("torchkeep sync", float("nan"))
        floor = steady.get(FLOOR, float("nan"))
        committed = f"{statistics.median(r['total']):.3f}" if r["total"] else "-"
        print(
            f"{case:<28}{r['stalls'][0]:>9.3f}{steady[case]:>10.3f}{steady[case] / sync_ref:>8.2f}x"
            f"{steady[case] / floor:>9.2f}x{committed:>19}"
        )
    if "torchkeep async" in results:
        rss = results["torchkeep async"]["rss"]
        print()
        print(f"RSS after each of {len(rss)} async saves (MiB): " + " ".join(f"{x / MiB:.0f}" for x in rss))
        print(f"growth from save 2 to save {len(rss)}: {(rss[-1] - rss[1]) / MiB:+.0f} MiB")
        print(
            f"async stall / sync save: {steady['torchkeep async'] / steady['torchkeep sync']:.2f}x (target <= 0.30x); "
            f"async stall / floor: {steady['torchkeep async'] / steady[FLOOR]:.2f}x "
            "(target <= 1.50x)"
        )


if __name__ == "__main__":
    main()
