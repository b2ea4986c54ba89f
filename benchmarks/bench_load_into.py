"""Load a ~1 GiB checkpoint into an existing model, and open one on the meta device.

Compares, each in a fresh process with the files in the page cache:
``torch.load`` + ``load_state_dict``, ``safetensors.torch.load_model`` and
``torchkeep.load_into``; then for a model built on ``meta``: torch's
``load(mmap=True)`` + ``load_state_dict(assign=True)`` against
``torchkeep.load_into(assign=True)``. Prints time, extra peak RSS and extra
private (anonymous) memory, as a share of the model's size.

    python benchmarks/bench_load_into.py [--repeat N] [--layers N]
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

from benchmarks.common import GiB, MiB, reset_peak, status

CASES = [
    "torch.load + load_state_dict",
    "safetensors load_model",
    "torchkeep load_into",
    "torchkeep load_into verify=False",
    "meta: torch.load mmap + assign",
    "meta: torchkeep load_into assign",
]


def build_model(layers: int, width: int = 1024, vocab: int = 32000, meta: bool = False):  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.ModuleDict({n: nn.Linear(width, width, bias=False) for n in "qkvo"})
            self.mlp = nn.ModuleDict(
                {"up": nn.Linear(width, 4 * width, bias=False), "down": nn.Linear(4 * width, width, bias=False)}
            )
            self.norm1 = nn.LayerNorm(width, bias=False)
            self.norm2 = nn.LayerNorm(width, bias=False)

    class Transformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, width)
            self.layers = nn.ModuleList([Block() for _ in range(layers)])
            self.norm = nn.LayerNorm(width, bias=False)

    with torch.device("meta"):
        model = Transformer()
    if not meta:
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()  # touch every page now, so the load's own memory is what gets measured
    return model


def run(case: str, base: str, layers: int) -> dict[str, float]:
    import safetensors.torch
    import torch

    import torchkeep

    model = build_model(layers, meta=case.startswith("meta"))
    for path in (f"{base}/model.pth", f"{base}/model.safetensors", f"{base}/tk/data-00000.safetensors"):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    reset_peak()
    before = status()
    start = time.perf_counter()
    if case == "torch.load + load_state_dict":
        model.load_state_dict(torch.load(f"{base}/model.pth", weights_only=True))
    elif case == "safetensors load_model":
        safetensors.torch.load_model(model, f"{base}/model.safetensors")
    elif case == "torchkeep load_into":
        torchkeep.load_into(model, f"{base}/tk")
    elif case == "torchkeep load_into verify=False":
        torchkeep.load_into(model, f"{base}/tk", verify=False)
    elif case == "meta: torch.load mmap + assign":
        model.load_state_dict(torch.load(f"{base}/model.pth", weights_only=True, mmap=True), assign=True)
    elif case == "meta: torchkeep load_into assign":
        torchkeep.load_into(model, f"{base}/tk", assign=True)
    seconds = time.perf_counter() - start
    after = status()
    x = model.embed.weight.sum().item()  # the model works
    assert x == x
    return {
        "seconds": seconds,
        "peak_extra": after["VmHWM"] - before["VmRSS"],
        "anon_extra": after["RssAnon"] - before["RssAnon"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--child", default=None)
    parser.add_argument("--base", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run(args.child, args.base, args.layers)))
        return
    import safetensors.torch
    import torch

    import torchkeep
    from benchmarks.common import transformer_state

    base = tempfile.mkdtemp(prefix="tk-bench-", dir=Path(__file__).resolve().parents[1])
    try:
        state = transformer_state(args.layers)
        size = sum(t.numel() * t.element_size() for t in state.values())
        largest = max(t.numel() * t.element_size() for t in state.values())
        torch.save(state, f"{base}/model.pth")
        safetensors.torch.save_file(state, f"{base}/model.safetensors")
        torchkeep.save(state, f"{base}/tk")
        del state
        results: dict[str, list[dict[str, float]]] = {c: [] for c in CASES}
        for _ in range(args.repeat):
            for case in CASES:
                cmd = [sys.executable, __file__, "--child", case, "--base", base, "--layers", str(args.layers)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                results[case].append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"model: {size / GiB:.2f} GiB float32, largest tensor {largest / MiB:.0f} MiB; median of {args.repeat} runs")
    print(f"machine: {os.cpu_count()} cores; page cache warm")
    print()
    med = {c: statistics.median(r["seconds"] for r in rs) for c, rs in results.items()}
    copy_cases = CASES[:4]
    fastest_other = min(med[c] for c in copy_cases[:2])
    print(f"{'case':<36}{'seconds':>9}{'vs fastest other':>18}{'peak extra':>12}{'% model':>9}{'private':>10}")
    for case in CASES:
        peak = statistics.median(r["peak_extra"] for r in results[case])
        anon = statistics.median(r["anon_extra"] for r in results[case])
        ref = fastest_other if case in copy_cases else med["meta: torch.load mmap + assign"]
        print(
            f"{case:<36}{med[case]:>9.3f}{med[case] / ref:>17.2f}x{peak / MiB:>9.0f} MiB"
            f"{100 * peak / size:>8.1f}%{anon / MiB:>6.0f} MiB"
        )
    tk_peak = statistics.median(r["peak_extra"] for r in results["torchkeep load_into"])
    print()
    print(f"load_into extra peak: {100 * tk_peak / size:.1f}% of the model (target <= 5%)")
    print(f"load_into time / fastest other: {med['torchkeep load_into'] / fastest_other:.2f}x (target <= 1.10x)")


if __name__ == "__main__":
    main()
