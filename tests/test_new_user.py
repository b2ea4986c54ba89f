"""What a new user hits: each everyday mistake gets a clear error or a warning, never silence."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import torchkeep


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("gzip", "unknown codec 'gzip'"),
        ("lz4", "unknown codec 'lz4'"),
        ("zstd:99", "from 1 to 22, not 99"),
        ("zstd:0", "from 1 to 22, not 0"),
        ("zstd:fast", "must be an integer from 1 to 22"),
        ("zstd:-3", "must be an integer from 1 to 22"),
    ],
)
def test_compression_messages_name_the_actual_problem(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(torchkeep.InvalidArgumentError, match=message):
        torchkeep.save({"w": torch.ones(2)}, tmp_path / "ckpt", compression=value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pt", ".pth", ".BIN"])
def test_torch_suffixes_save_a_torch_zip(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    torchkeep.save({"w": torch.arange(3.0)}, path)
    assert path.is_file()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3.0))
    assert torchkeep.inspect(path).format == "torch-zip"


@pytest.mark.parametrize("name", ["weights.json", "model.pkl", "state.npz", "x.tar"])
def test_other_suffixes_are_refused_with_the_list(tmp_path: Path, name: str) -> None:
    with pytest.raises(torchkeep.InvalidArgumentError, match=r"NAME\.safetensors, NAME\.pth, NAME\.pt, NAME\.bin"):
        torchkeep.save({"w": torch.ones(1)}, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["step-3", "run.2", "epoch-3.5", "v1.0.0"])
def test_names_without_a_file_suffix_are_native_directories(tmp_path: Path, name: str) -> None:
    torchkeep.save({"w": torch.ones(1)}, tmp_path / name)
    assert (tmp_path / name / "manifest.json").is_file()


# -- silent failures -----------------------------------------------------------------------------


def test_a_misspelled_monitor_is_refused_before_anything_is_saved(tmp_path: Path) -> None:
    with torchkeep.CheckpointManager(tmp_path, keep_last=1, keep_best=1, monitor="val_loss") as mgr:
        with pytest.raises(torchkeep.InvalidArgumentError, match=r"\['val_los'\] but not monitor='val_loss'"):
            mgr.save(1, metrics={"val_los": 0.1}, w=torch.ones(1))
        assert mgr.list() == []


def test_keep_best_deletes_nothing_while_no_checkpoint_has_the_metric(tmp_path: Path) -> None:
    with torchkeep.CheckpointManager(tmp_path, keep_last=1, keep_best=1, monitor="val_loss") as mgr:
        mgr.save(1, w=torch.ones(1))
        with pytest.warns(RuntimeWarning, match="nothing is deleted"):
            mgr.save(2, w=torch.ones(1))
        assert [r.step for r in mgr.list()] == [1, 2]
        mgr.save(3, metrics={"val_loss": 0.5}, w=torch.ones(1))
        assert [r.step for r in mgr.list()] == [3]  # ranked now: the best is also the newest


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*[nn.Linear(4, 4) for _ in range(40)])


def joint_checkpoint(path: Path) -> Net:
    net = Net()
    optimizer = torch.optim.AdamW(net.parameters())
    torchkeep.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}, path)
    return net


@pytest.mark.parametrize("strict", [True, False])
def test_a_joint_checkpoint_without_key_says_which_key_in_one_line(tmp_path: Path, strict: bool) -> None:
    joint_checkpoint(tmp_path / "ckpt")
    with pytest.raises(torchkeep.StateMismatchError, match=r"holds 80 of the 80: pass key='model'") as caught:
        torchkeep.load_into(Net(), tmp_path / "ckpt", strict=strict)
    assert "\n" not in str(caught.value)


def test_the_registry_path_to_a_manager_checkpoint_says_the_same(tmp_path: Path) -> None:
    net = Net()
    with torchkeep.CheckpointManager(tmp_path / "run", monitor="loss") as mgr:
        mgr.save(1, metrics={"loss": 1.0}, model=net)
        best = mgr.best()
    registry = torchkeep.Registry(tmp_path / "registry")
    registry.register("net", best)
    with pytest.raises(torchkeep.StateMismatchError, match="pass key='model'"):
        registry.load_into(Net(), "net")
    assert registry.load_into(Net(), "net", key="model").ok


@pytest.mark.parametrize("strict", [True, False])
def test_loading_nothing_is_never_silent(tmp_path: Path, strict: bool) -> None:
    torchkeep.save({"unrelated": torch.ones(3), "other.weight": torch.ones(2, 2)}, tmp_path / "ckpt")
    with pytest.raises(torchkeep.StateMismatchError, match=r"Nothing in .* fits Net: none of its 80 tensors"):
        torchkeep.load_into(Net(), tmp_path / "ckpt", strict=strict)


def test_a_long_list_of_problems_is_cut_short(tmp_path: Path) -> None:
    net = joint_checkpoint(tmp_path / "ckpt")
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("body.3")}
    state.update({f"extra.{i}": torch.ones(1) for i in range(50)})
    torchkeep.save(state, tmp_path / "partial")
    with pytest.raises(torchkeep.StateMismatchError, match=r"\.\.\. and \d+ more") as caught:
        torchkeep.load_into(Net(), tmp_path / "partial")
    assert str(caught.value).count("\n") < 30
    assert len(caught.value.report.unexpected) == 50  # the report keeps them all


class WithPositions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.register_buffer("positions", torch.arange(10), persistent=False)


def test_meta_assign_reports_and_warns_about_tensors_left_on_meta(tmp_path: Path) -> None:
    torchkeep.save(WithPositions().state_dict(), tmp_path / "ckpt")
    with torch.device("meta"):
        model = WithPositions()
    with pytest.warns(RuntimeWarning, match="positions"):
        report = torchkeep.load_into(model, tmp_path / "ckpt", assign=True)
    assert any("non-persistent" in note and "positions" in note for note in report.notes)
    assert not model.embed.weight.is_meta and model.positions.is_meta


def test_restore_of_a_missing_directory_says_so_and_can_be_required(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = nn.Linear(2, 2)
    with caplog.at_level(logging.INFO, logger="torchkeep"):
        assert torchkeep.CheckpointManager(tmp_path / "typo").restore(model=model) is None
    assert any(r.levelno == logging.WARNING and "does not exist" in r.getMessage() for r in caplog.records)
    with pytest.raises(torchkeep.CheckpointNotFoundError, match="required=True"):
        torchkeep.CheckpointManager(tmp_path / "typo").restore(model=model, required=True)
    (tmp_path / "empty").mkdir()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="torchkeep"):
        torchkeep.CheckpointManager(tmp_path / "empty").restore(model=model)
    assert [r.levelno for r in caplog.records] == [logging.INFO]


def test_restore_checks_every_object_before_touching_any(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, model=model, epoch=3)
    fresh = nn.Linear(2, 2)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    for wrong in ({}, [], 7):
        with pytest.raises((torchkeep.StateMismatchError, torchkeep.InvalidArgumentError), match="epoch"):
            torchkeep.CheckpointManager(tmp_path).restore(model=fresh, epoch=wrong)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())


# -- messages that mislead ------------------------------------------------------------------------


def test_a_device_this_machine_lacks_is_named_not_called_damage(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "model.pth")
    torchkeep.save({"w": torch.ones(2)}, tmp_path / "ckpt")
    for path in (tmp_path / "model.pth", tmp_path / "ckpt"):
        with pytest.raises(torchkeep.InvalidArgumentError, match=r"cuda:99.*map_location=\"cpu\""):
            torchkeep.load(path, map_location="cuda:99")


# -- objects users have ---------------------------------------------------------------------------


@dataclasses.dataclass
class TrainConfig:
    lr: float
    layers: int
    out: Path
    table: torch.Tensor


@dataclasses.dataclass
class Unregistered:
    name: str
    steps: int


class Vocab:
    def __init__(self, words: list[str]) -> None:
        self.words = words


torchkeep.register_type(TrainConfig)
torchkeep.register_type(
    Vocab, name="tests.Vocab", to_tree=lambda v: {"words": v.words}, from_tree=lambda t: Vocab(t["words"])
)


@pytest.mark.parametrize("suffix", ["", ".safetensors"])
def test_paths_dataclasses_and_registered_types_round_trip(tmp_path: Path, suffix: str) -> None:
    config = TrainConfig(lr=0.1, layers=3, out=Path("/runs/a"), table=torch.arange(4.0))
    state = {"config": config, "vocab": Vocab(["a", "b"]), "where": Path("data/train.txt")}
    torchkeep.save(state, tmp_path / f"ckpt{suffix}")
    loaded = torchkeep.load(tmp_path / f"ckpt{suffix}")
    assert isinstance(loaded["config"], TrainConfig) and loaded["config"].out == Path("/runs/a")
    assert torch.equal(loaded["config"].table, torch.arange(4.0)) and loaded["config"].lr == 0.1
    assert isinstance(loaded["vocab"], Vocab) and loaded["vocab"].words == ["a", "b"]
    assert loaded["where"] == Path("data/train.txt")
    info = torchkeep.inspect(tmp_path / f"ckpt{suffix}")
    assert info.tree["config"]["layers"] == 3  # inspect shows the fields, builds nothing


def test_an_unregistered_dataclass_saves_and_loads_back_as_its_fields_with_a_warning(tmp_path: Path) -> None:
    torchkeep.save({"run": Unregistered("a", 3)}, tmp_path / "ckpt")
    with pytest.warns(RuntimeWarning, match="register_type"):
        loaded = torchkeep.load(tmp_path / "ckpt")
    assert loaded["run"] == {"name": "a", "steps": 3}


def test_a_registered_type_missing_at_load_is_a_clear_error(tmp_path: Path) -> None:
    from torchkeep import extensions

    torchkeep.save({"vocab": Vocab(["x"])}, tmp_path / "ckpt")
    saved = extensions._by_name.pop("tests.Vocab")
    try:
        with pytest.raises(torchkeep.UnsupportedFormatError, match="register it the same way before loading"):
            torchkeep.load(tmp_path / "ckpt")
    finally:
        extensions._by_name["tests.Vocab"] = saved


def test_a_pth_refuses_what_only_pickle_could_hold(tmp_path: Path) -> None:
    with pytest.raises(torchkeep.UnsupportedObjectError, match=r"native or \.safetensors"):
        torchkeep.save({"where": Path("x")}, tmp_path / "model.pth")
    assert list(tmp_path.iterdir()) == []


def test_register_type_refuses_what_it_cannot_save() -> None:
    with pytest.raises(torchkeep.InvalidArgumentError, match="not a dataclass"):
        torchkeep.register_type(Vocab)
    with pytest.raises(torchkeep.InvalidArgumentError, match="already registered"):
        torchkeep.register_type(Unregistered, name="tests.Vocab")


def test_extra_state_of_a_module_round_trips(tmp_path: Path) -> None:
    class WithExtra(nn.Linear):
        def get_extra_state(self) -> Any:
            return {"vocab": Vocab(["w"]), "config": Path("cfg.yaml")}

        def set_extra_state(self, state: Any) -> None:
            self.restored = state

    torchkeep.save(WithExtra(2, 2).state_dict(), tmp_path / "ckpt")
    target = WithExtra(2, 2)
    assert torchkeep.load_into(target, tmp_path / "ckpt").ok
    assert target.restored["vocab"].words == ["w"] and target.restored["config"] == Path("cfg.yaml")


def test_metadata_takes_the_values_people_keep(tmp_path: Path) -> None:
    metadata = {
        "loss": torch.tensor(0.25),
        "acc": np.float32(0.5),
        "steps": np.int64(7),
        "config": Unregistered("a", 3),
        "out": Path("/runs/a"),
        "shape": (2, 3),
    }
    torchkeep.save({"w": torch.ones(1)}, tmp_path / "ckpt", metadata=metadata)
    assert torchkeep.inspect(tmp_path / "ckpt").metadata == {
        "loss": 0.25, "acc": 0.5, "steps": 7, "config": {"name": "a", "steps": 3}, "out": "/runs/a", "shape": [2, 3],
    }  # fmt: skip
    with pytest.raises(torchkeep.UnsupportedObjectError, match=r"metadata\['bad'\] is a builtins.object"):
        torchkeep.save({"w": torch.ones(1)}, tmp_path / "other", metadata={"bad": object()})
    with pytest.raises(torchkeep.UnsupportedObjectError, match="finite"):
        torchkeep.save({"w": torch.ones(1)}, tmp_path / "other", metadata={"nan": float("nan")})


class Payload:
    def __reduce__(self) -> Any:
        return (print, ("ran",))


def test_trust_is_accepted_wherever_a_message_asks_for_it(tmp_path: Path) -> None:
    torch.save({"weight": torch.ones(2, 2), "bias": torch.ones(2), "extra": Payload()}, tmp_path / "m.pth")
    with pytest.raises(torchkeep.UnsafeCheckpointError, match="trust=True"):
        torchkeep.load_into(nn.Linear(2, 2), tmp_path / "m.pth", strict=False)
    with pytest.warns(UserWarning, match="trust=True"):
        assert torchkeep.load_into(nn.Linear(2, 2), tmp_path / "m.pth", strict=False, trust=True).loaded
    with pytest.warns(UserWarning, match="trust=True"):
        assert torchkeep.verify(tmp_path / "m.pth", trust=True).tensors == 2
    with pytest.warns(UserWarning, match="trust=True"):
        assert len(torchkeep.inspect(tmp_path / "m.pth", trust=True).tensors) == 2


# -- asynchronous saves at exit ----------------------------------------------------------------

SLOW_EXIT = """
import sys, time, torch, torchkeep
import torchkeep.manager as manager
real = manager.write_job
def slow(job):
    time.sleep(float(sys.argv[2]))
    return real(job)
manager.write_job = slow
mgr = torchkeep.CheckpointManager(sys.argv[1], async_save=True)
mgr.save(1, w=torch.ones(4))
print("saved", flush=True)
"""


def test_exit_says_it_finishes_a_save_in_flight(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", SLOW_EXIT, str(tmp_path / "run"), "1"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "finishing the save of step 1" in out.stderr
    assert torchkeep.verify(tmp_path / "run" / "step-00000001").tensors >= 1


def test_a_second_ctrl_c_abandons_the_save_without_a_traceback(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    with subprocess.Popen(
        [sys.executable, "-c", SLOW_EXIT, str(tmp_path / "run"), "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # printed once the script's own code has ended and the exit waits
        assert "finishing the save of step 1" in line
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "abandoned the save of step 1" in rest and "Traceback" not in rest
    assert not (tmp_path / "run" / "step-00000001").exists()  # nothing half-written was published


# -- progress ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("suffix", "compression"), [("", None), ("", "zstd"), (".safetensors", None), (".pth", None)])
def test_save_and_verify_report_progress_up_to_the_total(tmp_path: Path, suffix: str, compression: str | None) -> None:
    state = {f"t{i}": torch.randn(1000) for i in range(20)}
    seen: list[tuple[int, int]] = []
    torchkeep.save(
        state, tmp_path / f"ckpt{suffix}", compression=compression, progress=lambda d, t: seen.append((d, t))
    )
    total = 20 * 1000 * 4
    assert seen[-1] == (total, total) and len(seen) > 2
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)  # never goes back
    checked: list[tuple[int, int]] = []
    torchkeep.verify(tmp_path / f"ckpt{suffix}", progress=lambda d, t: checked.append((d, t)))
    assert checked and checked[-1][0] == checked[-1][1] > 0


def test_a_flipped_byte_in_a_pth_is_caught_on_load(tmp_path: Path) -> None:
    import zipfile

    state = {"weight": torch.arange(64.0).reshape(8, 8), "bias": torch.zeros(8)}
    torchkeep.save(state, tmp_path / "m.pth")
    with zipfile.ZipFile(tmp_path / "m.pth") as archive:
        record = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size == 256)
    data = bytearray((tmp_path / "m.pth").read_bytes())
    local = record.header_offset  # the local header's own name and extra lengths (torch pads the extra)
    offset = local + 30 + int.from_bytes(data[local + 26 : local + 28], "little")
    offset += int.from_bytes(data[local + 28 : local + 30], "little")
    data[offset + 17] ^= 0x01  # one bit of the weight's bytes
    (tmp_path / "m.pth").write_bytes(bytes(data))
    with pytest.raises(torchkeep.ChecksumMismatchError, match="CRC"):
        torchkeep.load(tmp_path / "m.pth")
    with pytest.raises(torchkeep.ChecksumMismatchError, match="CRC"):
        torchkeep.load_into(nn.Linear(8, 8), tmp_path / "m.pth")
    loaded = torchkeep.load(tmp_path / "m.pth", verify=False)  # asked not to check: the damage is visible
    assert not torch.equal(loaded["weight"], state["weight"])


def test_the_first_asynchronous_save_says_it_allocates(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.INFO, logger="torchkeep"),
        torchkeep.CheckpointManager(tmp_path, async_save=True) as mgr,
    ):
        mgr.save(1, w=torch.ones(1024))
        mgr.save(2, w=torch.ones(1024))
    allocations = [r for r in caplog.records if "Allocating" in r.getMessage()]
    assert len(allocations) == 1 and "later saves reuse it" in allocations[0].getMessage()
