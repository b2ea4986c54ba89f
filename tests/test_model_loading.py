"""load_into: reports, renames, partial loading, optimizers, meta-device models and low memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from tests.conftest import assert_same

ROOT = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    def __init__(self, classes: int = 10, extra: bool = False) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, classes)
        if extra:
            self.adapter = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder(x)))


def trained(seed: int = 0, **kwargs: Any) -> Net:
    torch.manual_seed(seed)
    net = Net(**kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
        net.norm.running_mean.add_(1.5)
    return net


def same_params(a: nn.Module, b: nn.Module, keys: list[str] | None = None) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in (keys or list(sa)))


@pytest.mark.parametrize("name", ["ckpt", "ckpt.safetensors", "ckpt.pth"])
def test_exact_load_from_every_format(tmp_path: Path, name: str) -> None:
    source = trained()
    torchkeep.save(source.state_dict(), tmp_path / name)
    target = Net()
    report = torchkeep.load_into(target, tmp_path / name)
    assert report.ok and sorted(report.loaded) == sorted(source.state_dict())
    assert not (report.missing or report.unexpected or report.mismatched or report.cast or report.renamed)
    assert same_params(source, target)


def test_in_memory_state_dict_source() -> None:
    source, target = trained(), Net()
    report = torchkeep.load_into(target, source.state_dict())
    assert report.ok and same_params(source, target)


def test_subtree_of_a_training_checkpoint(tmp_path: Path) -> None:
    source = trained()
    opt = torch.optim.SGD(source.parameters(), lr=0.1)
    torchkeep.save({"model": source.state_dict(), "optimizer": opt.state_dict(), "step": 5}, tmp_path / "ckpt")
    target = Net()
    torchkeep.load_into(target, tmp_path / "ckpt", key="model")
    assert same_params(source, target)
    with pytest.raises(torchkeep.InvalidArgumentError, match="top-level keys are"):
        torchkeep.load_into(target, tmp_path / "ckpt", key="modle")


def test_strict_failure_lists_every_problem_and_loads_nothing(tmp_path: Path) -> None:
    source = trained(classes=10)
    state = source.state_dict()
    state["leftover.weight"] = torch.zeros(2)
    torchkeep.save(state, tmp_path / "ckpt")
    target = Net(classes=5, extra=True)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(torchkeep.StateMismatchError) as err:
        torchkeep.load_into(target, tmp_path / "ckpt")
    message = str(err.value)
    for fragment in ("adapter.weight", "adapter.bias", "leftover.weight", "head.weight", "head.bias", "5 problem(s)"):
        assert fragment in message
    report = err.value.report
    assert sorted(report.missing) == ["adapter.bias", "adapter.weight"]
    assert report.unexpected == ["leftover.weight"]
    assert {m.key for m in report.mismatched} == {"head.weight", "head.bias"}
    assert isinstance(err.value, ValueError)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items()), "a failed load changed the model"


def test_fine_tuning_loads_backbone_and_skips_new_head(tmp_path: Path) -> None:
    source = trained(classes=10)
    torchkeep.save(source.state_dict(), tmp_path / "ckpt")
    target = Net(classes=3)
    head_before = target.head.weight.clone()
    report = torchkeep.load_into(target, tmp_path / "ckpt", strict=False, on_mismatch="skip")
    assert report.skipped == ["head.weight", "head.bias"]
    (mismatch, _) = report.mismatched
    assert (mismatch.expected_shape, mismatch.found_shape) == ((3, 16), (10, 16))
    assert torch.equal(target.head.weight, head_before)
    backbone = [k for k in source.state_dict() if not k.startswith("head.")]
    assert sorted(report.loaded) == sorted(backbone)
    assert same_params(source, target, backbone)
    assert not report.ok


def test_shape_mismatch_raises_even_when_not_strict(tmp_path: Path) -> None:
    torchkeep.save(trained(classes=10).state_dict(), tmp_path / "ckpt")
    with pytest.raises(torchkeep.StateMismatchError, match='on_mismatch="skip"'):
        torchkeep.load_into(Net(classes=3), tmp_path / "ckpt", strict=False)


def test_missing_keys_with_strict_false(tmp_path: Path) -> None:
    torchkeep.save(trained().state_dict(), tmp_path / "ckpt")
    target = Net(extra=True)
    report = torchkeep.load_into(target, tmp_path / "ckpt", strict=False)
    assert sorted(report.missing) == ["adapter.bias", "adapter.weight"] and not report.ok


def test_dtype_cast_into_the_targets_dtype(tmp_path: Path) -> None:
    source = trained()
    torchkeep.save(source.state_dict(), tmp_path / "ckpt")
    target = Net().to(torch.bfloat16)
    report = torchkeep.load_into(target, tmp_path / "ckpt")
    assert {c.key for c in report.cast} == {k for k, v in source.state_dict().items() if v.is_floating_point()}
    assert report.cast[0].from_dtype == "float32" and report.cast[0].to_dtype == "bfloat16"
    assert torch.equal(target.head.weight, source.head.weight.to(torch.bfloat16))
    assert target.norm.num_batches_tracked.dtype == torch.int64


@pytest.mark.parametrize(
    ("prefix", "origin"),
    [("module.", "DistributedDataParallel"), ("_orig_mod.", "torch.compile"), ("module._orig_mod.", "around")],
)
def test_wrapper_prefixes_are_removed_and_reported(tmp_path: Path, prefix: str, origin: str) -> None:
    source = trained()
    torchkeep.save({prefix + k: v for k, v in source.state_dict().items()}, tmp_path / "ckpt")
    target = Net()
    report = torchkeep.load_into(target, tmp_path / "ckpt")
    assert report.ok and same_params(source, target)
    assert len(report.notes) == 1 and repr(prefix) in report.notes[0] and origin in report.notes[0]
    assert ("module." * 0 + prefix + "head.bias", "head.bias") in report.renamed


class Compiled(nn.Module):
    """Holds its model as torch.compile's wrapper does, so its keys carry "_orig_mod."."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._orig_mod = model


def test_prefix_added_for_a_compiled_target(tmp_path: Path) -> None:
    source = trained()
    torchkeep.save(source.state_dict(), tmp_path / "ckpt")
    compiled = Compiled(Net())
    report = torchkeep.load_into(compiled, tmp_path / "ckpt")
    assert report.ok and "added prefix '_orig_mod.'" in report.notes[0]
    assert torch.equal(compiled.state_dict()["_orig_mod.head.weight"], source.head.weight)


@pytest.mark.parametrize(
    "rename",
    [
        {"backbone.": "encoder."},
        [(r"^backbone\.(\d+)\.", r"encoder.\1.")],
        lambda key: key.replace("backbone.", "encoder."),
    ],
    ids=["prefix-dict", "regex", "callable"],
)
def test_user_renames(tmp_path: Path, rename: Any) -> None:
    source = trained()
    state = {k.replace("encoder.", "backbone."): v for k, v in source.state_dict().items()}
    torchkeep.save(state, tmp_path / "ckpt")
    target = Net()
    report = torchkeep.load_into(target, tmp_path / "ckpt", rename=rename)
    assert report.ok and same_params(source, target)
    assert ("backbone.0.weight", "encoder.0.weight") in report.renamed
    assert len(report.renamed) == 4


def test_rename_collisions_are_refused() -> None:
    with pytest.raises(torchkeep.InvalidArgumentError, match="both become"):
        torchkeep.load_into(Net(), {"a": torch.ones(1), "b": torch.ones(1)}, rename=lambda k: "x", strict=False)


def test_report_str_and_dict(tmp_path: Path) -> None:
    torchkeep.save({"module." + k: v for k, v in trained(classes=10).state_dict().items()}, tmp_path / "ckpt")
    report = torchkeep.load_into(Net(classes=4, extra=True), tmp_path / "ckpt", strict=False, on_mismatch="skip")
    text = str(report)
    assert text.startswith("LoadReport: 9 loaded, 2 missing, 0 unexpected, 2 mismatched")
    assert "mismatched  head.weight" in text and "[10, 16] → [4, 16], skipped" in text
    assert "missing     adapter.weight" in text and "from module.encoder.0.weight" in text
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["ok"] is False and data["mismatched"][0]["key"] == "head.weight"


def test_damaged_tensor_is_reported(tmp_path: Path) -> None:
    torchkeep.save(trained().state_dict(), tmp_path / "ckpt")
    shard = tmp_path / "ckpt" / "data-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 1  # the last float32 tensor in the layout
    shard.write_bytes(bytes(data))
    with pytest.raises(torchkeep.ChecksumMismatchError) as err:
        torchkeep.load_into(Net(), tmp_path / "ckpt")
    assert len(err.value.damaged) == 1 and "load a good checkpoint" in str(err.value)
    torchkeep.load_into(Net(), tmp_path / "ckpt", verify=False)


def test_meta_device_model_with_assign(tmp_path: Path) -> None:
    source = trained().eval()
    torchkeep.save(source.state_dict(), tmp_path / "ckpt")
    with torch.device("meta"):
        target = Net()
    with pytest.raises(torchkeep.InvalidArgumentError, match="assign=True"):
        torchkeep.load_into(target, tmp_path / "ckpt")
    report = torchkeep.load_into(target, tmp_path / "ckpt", assign=True)
    assert report.ok
    assert all(not p.is_meta for p in target.state_dict().values())
    assert all(isinstance(p, nn.Parameter) for p in target.parameters())
    x = torch.randn(4, 8)
    assert torch.equal(target.eval()(x), source(x))


def test_assign_casts_to_the_declared_dtype(tmp_path: Path) -> None:
    torchkeep.save(trained().state_dict(), tmp_path / "ckpt")
    with torch.device("meta"):
        target = Net().to(torch.bfloat16)
    report = torchkeep.load_into(target, tmp_path / "ckpt", assign=True)
    assert target.head.weight.dtype == torch.bfloat16 and report.cast


OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "sgd": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
}


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_optimizer_round_trip_gives_identical_next_steps(tmp_path: Path, make: Any) -> None:
    model = trained()
    opt = make(model.parameters())
    x = torch.randn(6, 8)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    torchkeep.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt")
    twin = Net()
    twin_opt = make(twin.parameters())
    torchkeep.load_into(twin, tmp_path / "ckpt", key="model")
    report = torchkeep.load_into(twin_opt, tmp_path / "ckpt", key="optimizer")
    assert report.loaded
    for m, o in ((model, opt), (twin, twin_opt)):
        for _ in range(2):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    assert same_params(model, twin)


def test_optimizer_mismatch_names_group_and_parameter(tmp_path: Path) -> None:
    model = trained()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    torchkeep.save(opt.state_dict(), tmp_path / "opt")
    two_groups = torch.optim.Adam([{"params": model.encoder.parameters()}, {"params": model.head.parameters()}])
    with pytest.raises(torchkeep.StateMismatchError, match="1 parameter group"):
        torchkeep.load_into(two_groups, tmp_path / "opt")
    fewer = torch.optim.Adam(list(model.parameters())[:-1])
    with pytest.raises(
        torchkeep.StateMismatchError, match=r"param_groups\[0\] holds 8 parameter\(s\) in the checkpoint"
    ):
        torchkeep.load_into(fewer, tmp_path / "opt")
    other = Net(classes=3)
    with pytest.raises(torchkeep.StateMismatchError, match=r"parameter 6: its 'exp_avg' has shape \[10, 16\]"):
        torchkeep.load_into(torch.optim.Adam(other.parameters()), tmp_path / "opt")


def test_any_stateful_object(tmp_path: Path) -> None:
    class Counter:
        def __init__(self) -> None:
            self.n = 0

        def state_dict(self) -> dict[str, Any]:
            return {"n": self.n, "hist": torch.arange(3)}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.n = state["n"]

    c = Counter()
    c.n = 41
    torchkeep.save(c.state_dict(), tmp_path / "c")
    fresh = Counter()
    report = torchkeep.load_into(fresh, tmp_path / "c")
    assert fresh.n == 41 and report.loaded == ["hist"]
    with pytest.raises(torchkeep.InvalidArgumentError, match="load_state_dict"):
        torchkeep.load_into(object(), tmp_path / "c")


def test_buffers_and_tied_weights_load(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.out = nn.Linear(8, 20, bias=False)
            self.out.weight = self.emb.weight

    source = Tied()
    torchkeep.save(source.state_dict(), tmp_path / "ckpt")
    target = Tied()
    report = torchkeep.load_into(target, tmp_path / "ckpt")
    assert report.ok and target.out.weight is target.emb.weight
    assert_same(source.emb.weight.detach(), target.emb.weight.detach())


PEAK = textwrap.dedent(
    """
    import json, re, sys
    import torch, torchkeep
    from torch import nn

    def status(field):
        text = open("/proc/self/status").read()
        return int(re.search(rf"^{field}:\\s+(\\d+) kB", text, re.M).group(1)) * 1024

    path, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(24)])  # 24 x 4 MiB
    if mode == "save":
        torchkeep.save(model.state_dict(), path)
        sys.exit(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    if mode == "torchkeep":
        torchkeep.load_into(model, path)
    else:
        model.load_state_dict(torchkeep.load(path, verify=False) if mode == "mmap" else torch.load(path))
    print(json.dumps({"extra_peak": status("VmHWM") - before}))
    """
)


def test_streaming_load_keeps_extra_memory_near_one_tensor(tmp_path: Path) -> None:
    largest = 1024 * 1024 * 4
    path = str(tmp_path / "ckpt")
    subprocess.run([sys.executable, "-c", PEAK, path, "save"], check=True, cwd=ROOT)
    out = subprocess.run(
        [sys.executable, "-c", PEAK, path, "torchkeep"], check=True, cwd=ROOT, capture_output=True, text=True
    )
    extra = json.loads(out.stdout)["extra_peak"]
    assert extra < 2 * largest, f"load_into added {extra / 2**20:.1f} MiB at peak; the largest tensor is 4 MiB"
