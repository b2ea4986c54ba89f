"""GPU paths, run on a machine with CUDA: device mapping, loading into CUDA models, saving from the GPU.

Checks (each prints PASS/FAIL) and timings, side by side in one run:
1. a state saved from CUDA loads on the CPU by default, and where map_location says;
2. a plain torch.save of CUDA tensors loads on the CPU through torchkeep;
3. load_into a CUDA model from a CPU checkpoint (pinned staging), with a cast to bf16;
4. assign=True on a meta model with map_location="cuda";
5. save of ~1 GiB of CUDA tensors: torchkeep vs torch.save+fsync vs safetensors+fsync;
6. load of ~1 GiB into a CUDA model: torchkeep load_into vs torch.load+load_state_dict vs
   safetensors load_model(device="cuda");
7. FSDP2 on one GPU with NCCL (a one-rank job): a CheckpointManager saves the sharded model and
   optimizer (synchronously and asynchronously, staged in pinned memory) and restores them exactly,
   and the checkpoint loads whole on the CPU without torch.distributed.

    python benchmarks/gpu_check.py OUTDIR
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import torchkeep
from benchmarks.bench_load_into import build_model
from benchmarks.common import fsync_path, transformer_state

RESULTS: dict[str, Any] = {}


def check(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.setdefault("checks", {})[name] = ok
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)


def timed(fn: Any) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def small_state() -> dict[str, Any]:
    g = torch.Generator(device="cuda").manual_seed(0)
    return {
        "w": torch.randn(256, 256, device="cuda", generator=g),
        "bf16": torch.randn(64, 64, device="cuda", generator=g).to(torch.bfloat16),
        "i": torch.arange(10, device="cuda"),
        "t": torch.randn(32, 16, device="cuda", generator=g).t(),
        "rng": torch.cuda.get_rng_state(),
        "step": 3,
    }


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())


def mapping_checks(d: str) -> None:
    state = small_state()
    torchkeep.save(state, f"{d}/gpu")
    info = torchkeep.inspect(f"{d}/gpu")
    check(
        "device recorded", {t.device for t in info.tensors} == {"cuda:0", "cpu"}, str({t.device for t in info.tensors})
    )
    cpu = torchkeep.load(f"{d}/gpu")
    check("default load on cpu", all(v.device.type == "cpu" for v in cpu.values() if isinstance(v, torch.Tensor)))
    check("values exact", all(same(state[k], cpu[k]) for k in ("w", "bf16", "i", "t", "rng")))
    on_gpu = torchkeep.load(f"{d}/gpu", map_location="cuda:0")
    check("map_location cuda", on_gpu["w"].is_cuda and same(on_gpu["w"], state["w"]))
    as_saved = torchkeep.load(f"{d}/gpu", map_location={"cpu": "cpu"})
    check("dict map keeps saved devices", as_saved["w"].is_cuda and not as_saved["rng"].is_cuda)
    swapped = torchkeep.load(f"{d}/gpu", map_location={"cuda:0": "cpu"})
    check("dict map cuda->cpu", not swapped["w"].is_cuda)
    called = torchkeep.load(f"{d}/gpu", map_location=lambda t, loc: t.cuda() if loc.startswith("cuda") else t)
    check("callable map", called["w"].is_cuda and not called["rng"].is_cuda)
    torch.save(state, f"{d}/plain.pth")
    pth = torchkeep.load(f"{d}/plain.pth")
    check("torch.save of cuda tensors loads on cpu", not pth["w"].is_cuda and same(pth["w"], state["w"]))
    torchkeep.save(state, f"{d}/gpu.safetensors")
    check("safetensors from cuda", same(torchkeep.load(f"{d}/gpu.safetensors")["t"], state["t"]))


def load_into_checks(d: str) -> None:
    torch.manual_seed(0)
    source = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.BatchNorm1d(128), torch.nn.Linear(128, 8))
    torchkeep.save(source.state_dict(), f"{d}/cpu-ckpt")
    target = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.BatchNorm1d(128), torch.nn.Linear(128, 8)).cuda()
    report = torchkeep.load_into(target, f"{d}/cpu-ckpt")
    ok = all(same(v, source.state_dict()[k]) for k, v in target.state_dict().items())
    check("load_into cuda model from cpu checkpoint", report.ok and ok and target[0].weight.is_cuda)
    half = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.BatchNorm1d(128), torch.nn.Linear(128, 8))
    half = half.cuda().to(torch.bfloat16)
    report = torchkeep.load_into(half, f"{d}/cpu-ckpt")
    check(
        "load_into cuda bf16 model (cast)",
        bool(report.cast) and same(half[0].weight, source[0].weight.to(torch.bfloat16)),
    )
    with torch.device("meta"):
        meta = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.BatchNorm1d(128), torch.nn.Linear(128, 8))
    torchkeep.load_into(meta, f"{d}/cpu-ckpt", assign=True, map_location="cuda")
    x = torch.randn(4, 64)
    out = meta.eval()(x.cuda()).cpu()
    check("meta + assign onto cuda", meta[0].weight.is_cuda and torch.allclose(out, source.eval()(x), atol=1e-5))


def async_checks(d: str) -> None:
    """An asynchronous save of a CUDA model holds the values at the call, though training changes them at once."""
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024)).cuda()
    before = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with torchkeep.CheckpointManager(f"{d}/async", async_save=True) as mgr:
        handle = mgr.save(1, model=model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # queued on the default stream right after save returns
        handle.wait()
        pinned = mgr._staging._buffer is not None and mgr._staging._buffer.is_pinned()
    loaded = torchkeep.load(f"{d}/async/step-00000001")["model"]
    check("async save of cuda model holds values at the call", all(torch.equal(loaded[k], before[k]) for k in before))
    check("staging buffer is pinned for cuda state", pinned)


def save_timings(d: str) -> None:
    import safetensors.torch

    state = {k: v.cuda() for k, v in transformer_state().items()}
    size = sum(t.numel() * t.element_size() for t in state.values())
    rows = {}
    for _ in range(3):
        for name, fn in {
            "torchkeep.save": lambda: torchkeep.save(state, f"{d}/big-tk"),
            "torch.save+fsync": lambda: (torch.save(state, f"{d}/big.pth"), fsync_path(f"{d}/big.pth")),
            "safetensors+fsync": lambda: (
                safetensors.torch.save_file(state, f"{d}/big.safetensors"),
                fsync_path(f"{d}/big.safetensors"),
            ),
        }.items():
            rows.setdefault(name, []).append(timed(fn))
    med = {k: sorted(v)[1] for k, v in rows.items()}
    RESULTS["save_from_gpu_seconds"] = med
    print(f"save {size / 2**30:.2f} GiB from CUDA (median of 3):")
    for k, v in med.items():
        print(f"  {k:<20} {v:.3f} s  {size / 2**30 / v:.2f} GiB/s  {v / med['torchkeep.save']:.2f}x torchkeep")
    loaded = torchkeep.load(f"{d}/big-tk", map_location="cuda")
    check("1 GiB round trip from cuda", all(torch.equal(loaded[k], state[k]) for k in state))


def load_timings(d: str) -> None:
    import safetensors.torch

    torch.cuda.empty_cache()
    model = build_model(18, meta=True).to_empty(device="cuda")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    load_rows: dict[str, list[float]] = {}
    for _ in range(3):
        for name, fn in {
            "torchkeep load_into": lambda: torchkeep.load_into(model, f"{d}/big-tk"),
            "torch.load(map_location=cuda)+load_state_dict": lambda: model.load_state_dict(
                torch.load(f"{d}/big.pth", map_location="cuda", weights_only=True)
            ),
            "safetensors load_model(device=cuda)": lambda: safetensors.torch.load_model(
                model, f"{d}/big.safetensors", device="cuda"
            ),
        }.items():
            load_rows.setdefault(name, []).append(timed(fn))
    lmed = {k: sorted(v)[1] for k, v in load_rows.items()}
    RESULTS["load_into_gpu_seconds"] = lmed
    print("load 1 GiB into a CUDA model (median of 3, page cache warm):")
    for k, v in lmed.items():
        print(f"  {k:<48} {v:.3f} s  {v / lmed['torchkeep load_into']:.2f}x torchkeep")
    check("load_into cuda values", torch.equal(model.embed.weight[:4].cpu(), transformer_state()["embed.weight"][:4]))


def fsdp_nccl_checks(d: str) -> None:
    """One NCCL rank: FSDP2 state saved through DCP by the manager, restored exactly; the async save's staging."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("nccl", init_method=f"file://{d}/rendezvous", rank=0, world_size=1)
    try:

        def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256)).cuda()
            mesh = init_device_mesh("cuda", (1,))
            for module in (model[0], model[2], model):
                fully_shard(module, mesh=mesh)
            return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

        def whole(model: torch.nn.Module) -> dict[str, torch.Tensor]:
            return {k: v.full_tensor().cpu() for k, v in model.state_dict().items()}

        model, optimizer = build()
        for _ in range(3):
            model(torch.randn(8, 256, device="cuda")).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        with torchkeep.CheckpointManager(f"{d}/fsdp") as mgr:
            mgr.save(3, model=model, optimizer=optimizer)
            at_save = whole(model)
            handle = mgr.save(4, model=model, optimizer=optimizer, async_save=True)
            at_async = whole(model)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)  # right after the snapshot
            handle.wait()
            pinned = all(t.is_pinned() for t in mgr._dcp_staging.values())
        fresh, fresh_optimizer = build()
        record = torchkeep.CheckpointManager(f"{d}/fsdp").restore(3, model=fresh, optimizer=fresh_optimizer)
        check("fsdp2 nccl restore is exact", record is not None and all(
            torch.equal(v, at_save[k]) for k, v in whole(fresh).items()))  # fmt: skip
        loaded = torchkeep.load(f"{d}/fsdp/step-00000004")["model"]
        check("fsdp2 nccl async save holds the values at the call",
              all(torch.equal(loaded[k], at_async[k]) for k in at_async))  # fmt: skip
        check("fsdp2 async staging is pinned", pinned)
    finally:
        dist.destroy_process_group()


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, device {torch.cuda.get_device_name(0)}", flush=True)
    RESULTS["device"] = torch.cuda.get_device_name(0)
    RESULTS["torch"] = torch.__version__
    d = tempfile.mkdtemp(prefix="tk-gpu-")
    try:
        for section in (mapping_checks, load_into_checks, async_checks, fsdp_nccl_checks, save_timings, load_timings):
            try:
                section(d)
            except Exception:
                traceback.print_exc()
                check(section.__name__, False, "raised")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
