"""Save and load ~1 GiB with torchkeep, torch.save/torch.load and safetensors, side by side.

Each case runs in a fresh process so one tool's memory never counts against
another. Prints seconds, GiB/s and memory, with ratios to torchkeep and to the
machine's own limit: a raw sequential write of the same bytes plus fsync.

    python benchmarks/bench_save_load.py [--dir DIR] [--repeat N] [--layers N]

Loads run with the files in the page cache (each tool is loaded right after a
warm-up read), so they measure the loader, not the disk.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import GiB, MiB, fsync_path, reset_peak, state_bytes, status, transformer_state

SAVE_CASES = ["raw write+fsync", "torchkeep", "torch.save+fsync", "safetensors+fsync"]
LOAD_CASES = ["torchkeep", "torchkeep verify=False", "torch.load", "torch.load mmap", "safetensors load_file"]
FILES = {
    "raw write+fsync": "raw.bin",
    "torchkeep": "tk",
    "torch.save+fsync": "torch.pth",
    "safetensors+fsync": "st.safetensors",
}
LOAD_FILES = {
    "torchkeep": "tk",
    "torchkeep verify=False": "tk",
    "torch.load": "torch.pth",
    "torch.load mmap": "torch.pth",
    "safetensors load_file": "st.safetensors",
}


def run_save(case: str, path: str, layers: int) -> dict[str, float]:
    import safetensors.torch
    import torch

    import torchkeep

    state = transformer_state(layers)
    reset_peak()
    before = status()
    start = time.perf_counter()
    if case == "raw write+fsync":
        with open(path, "wb", buffering=0) as f:
            for t in state.values():
                f.write(t.numpy().data)
            os.fsync(f.fileno())
    elif case == "torchkeep":
        torchkeep.save(state, path)
    elif case == "torch.save+fsync":
        torch.save(state, path)
        fsync_path(path)
    elif case == "safetensors+fsync":
        safetensors.torch.save_file(state, path)
        fsync_path(path)
    seconds = time.perf_counter() - start
    after = status()
    return {"seconds": seconds, "peak_extra": after["VmHWM"] - before["VmRSS"], "bytes": state_bytes(state)}


def touch(obj: object) -> int:
    """Read every byte of every tensor (a cheap checksum), as training would."""
    import torch
    import xxhash

    total = 0
    for t in obj.values():  # type: ignore[attr-defined]
        if isinstance(t, torch.Tensor):
            xxhash.xxh3_64(t.contiguous().view(torch.uint8).numpy().data)
            total += t.numel() * t.element_size()
    return total


def run_load(case: str, path: str) -> dict[str, float]:
    import safetensors.torch
    import torch

    import torchkeep

    with open(path if os.path.isfile(path) else os.path.join(path, "data-00000.safetensors"), "rb") as f:
        while f.read(1 << 24):  # warm the page cache so every tool starts alike
            pass
    reset_peak()
    before = status()
    start = time.perf_counter()
    if case == "torchkeep":
        obj = torchkeep.load(path)
    elif case == "torchkeep verify=False":
        obj = torchkeep.load(path, verify=False)
    elif case == "torch.load":
        obj = torch.load(path, weights_only=True)
    elif case == "torch.load mmap":
        obj = torch.load(path, weights_only=True, mmap=True)
    else:
        obj = safetensors.torch.load_file(path)
    seconds = time.perf_counter() - start
    # torchkeep with verify=True has already read every byte (to check it); the
    # others are lazy or copy, so read their bytes once for a like-for-like figure.
    if case != "torchkeep":
        touch(obj)
    all_read = time.perf_counter() - start
    after = status()
    return {
        "seconds": seconds,
        "seconds_all_read": all_read,
        "anon_extra": after["RssAnon"] - before["RssAnon"],
        "peak_extra": after["VmHWM"] - before["VmRSS"],
    }


def child(args: argparse.Namespace) -> None:
    result = run_save(args.case, args.path, args.layers) if args.op == "save" else run_load(args.case, args.path)
    print(json.dumps(result))


def spawn(op: str, case: str, path: str, layers: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", op, "--case", case, "--path", path, "--layers", str(layers)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir on the repo's disk)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--child", choices=["save", "load"], dest="op")
    parser.add_argument("--case")
    parser.add_argument("--path")
    args = parser.parse_args()
    if args.op:
        child(args)
        return
    base = args.dir or tempfile.mkdtemp(prefix="tk-bench-", dir=Path(__file__).resolve().parents[1])
    os.makedirs(base, exist_ok=True)
    try:
        saves: dict[str, list[dict[str, float]]] = {c: [] for c in SAVE_CASES}
        for _ in range(args.repeat):  # interleaved, so drift in the machine hits every case alike
            for case in SAVE_CASES:
                path = os.path.join(base, FILES[case])
                remove(path)
                saves[case].append(spawn("save", case, path, args.layers))
        loads: dict[str, list[dict[str, float]]] = {c: [] for c in LOAD_CASES}
        for _ in range(args.repeat):
            for case in LOAD_CASES:
                loads[case].append(spawn("load", case, os.path.join(base, LOAD_FILES[case]), args.layers))
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    size = saves["torchkeep"][0]["bytes"]
    print(
        f"state: {size / GiB:.2f} GiB float32, transformer layout; "
        f"median of {args.repeat} runs, each in a fresh process"
    )
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}")
    print()
    med = {c: statistics.median(r["seconds"] for r in rs) for c, rs in saves.items()}
    print(f"{'save':<22}{'seconds':>9}{'GiB/s':>8}{'vs torchkeep':>14}{'vs raw':>9}{'peak extra MiB':>16}")
    for case in SAVE_CASES:
        peak = statistics.median(r["peak_extra"] for r in saves[case]) / MiB
        print(
            f"{case:<22}{med[case]:>9.3f}{size / GiB / med[case]:>8.2f}"
            f"{med[case] / med['torchkeep']:>13.2f}x{med[case] / med['raw write+fsync']:>8.2f}x{peak:>16.0f}"
        )
    print()
    lmed = {c: statistics.median(r["seconds"] for r in rs) for c, rs in loads.items()}
    tmed = {c: statistics.median(r["seconds_all_read"] for r in rs) for c, rs in loads.items()}
    print("load, page cache warm. 'all bytes read': until every byte was read once (torchkeep verifies")
    print("while loading; the others get one xxh3 pass after). private: anonymous memory added;")
    print("peak: RSS high-water added, mapped file pages included.")
    print(f"{'load':<24}{'call s':>9}{'all bytes read s':>18}{'vs torchkeep':>14}{'private MiB':>13}{'peak MiB':>10}")
    for case in LOAD_CASES:
        anon = statistics.median(r["anon_extra"] for r in loads[case]) / MiB
        peak = statistics.median(r["peak_extra"] for r in loads[case]) / MiB
        print(
            f"{case:<24}{lmed[case]:>9.3f}{tmed[case]:>18.3f}{tmed[case] / tmed['torchkeep']:>13.2f}x"
            f"{anon:>13.0f}{peak:>10.0f}"
        )
    print()
    print(f"torchkeep save / raw write+fsync: {med['torchkeep'] / med['raw write+fsync']:.2f}x (target <= 1.10x)")
    print(f"torchkeep save / torch.save+fsync: {med['torchkeep'] / med['torch.save+fsync']:.2f}x (target <= 1.00x)")
    print(f"torchkeep save / safetensors+fsync: {med['torchkeep'] / med['safetensors+fsync']:.2f}x (target <= 1.00x)")
    print(
        f"torchkeep load (verified, every byte read) / safetensors load_file (every byte read): "
        f"{tmed['torchkeep'] / tmed['safetensors load_file']:.2f}x (target <= 1.00x)"
    )
    print(
        f"torchkeep load private memory: {statistics.median(r['anon_extra'] for r in loads['torchkeep']) / MiB:.0f} MiB"
    )


if __name__ == "__main__":
    main()
