"""Hostile pickles and hostile torch files: the static scan, the .pth reader and writer.

Every payload here only creates a file named MARKER in the current directory
(``touch MARKER`` through ``os.system``, or ``open('MARKER', 'w')`` through
``exec``); the tests run torchkeep from a directory of ``tmp_path`` and check
that the marker never appears. Each test names, in its docstring, the guard it
checks: the test fails when that guard is taken out.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import pickletools
import random
import re
import struct
import subprocess
import sys
import tarfile
import textwrap
import threading
import warnings
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep
import torchkeep.scan as scan_module
from tests.conftest import causes
from torchkeep.cli import main as cli_main
from torchkeep.formats.pth import crc_check, load_pth
from torchkeep.scan import ScanResult, scan_bytes, scan_file
from torchkeep.storage import LocalStorage

MARKER = "MARKER"
SYSTEM = "touch MARKER"
EXEC = "open('MARKER', 'w').close()"

# -- writing pickles by hand ----------------------------------------------------------------------

PROTO2, PROTO4 = b"\x80\x02", b"\x80\x04"
STOP, MARK, POP, POP_MARK, DUP = b".", b"(", b"0", b"1", b"2"
TUPLE, TUPLE1, TUPLE2, EMPTY_TUPLE = b"t", b"\x85", b"\x86", b")"
REDUCE, BUILD, NEWOBJ, OBJ = b"R", b"b", b"\x81", b"o"
EMPTY_DICT, EMPTY_LIST, SETITEM = b"}", b"]", b"s"
STACK_GLOBAL, MEMOIZE, BINPERSID = b"\x93", b"\x94", b"Q"


def uni(text: str) -> bytes:
    """BINUNICODE (protocol 1+; what torch.save writes)."""
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def short(text: str) -> bytes:
    """SHORT_BINUNICODE (protocol 4)."""
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def put(index: int) -> bytes:
    return b"r" + struct.pack("<I", index)  # LONG_BINPUT


def get(index: int) -> bytes:
    return b"j" + struct.pack("<I", index)  # LONG_BINGET


def call(callee: bytes, arg: str) -> bytes:
    """``callee(arg)``: one value left on the stack."""
    return callee + uni(arg) + TUPLE1 + REDUCE


def system() -> bytes:
    return call(glob("os", "system"), SYSTEM)


def whole(expr: bytes, proto: bytes = PROTO2) -> bytes:
    """A complete pickle whose value is ``expr``."""
    return proto + expr + STOP


# Expressions that run the payload when fully unpickled (each leaves one value on the stack).
# The STACK_GLOBAL ones hide the real operands from a scanner that guesses from the last strings seen.
RUNS: dict[str, Callable[[], bytes]] = {
    "GLOBAL os.system": system,
    "GLOBAL posix.system": lambda: call(glob("posix", "system"), SYSTEM),
    "GLOBAL builtins.exec": lambda: call(glob("builtins", "exec"), EXEC),
    "GLOBAL __builtin__.exec (mapped)": lambda: call(glob("__builtin__", "exec"), EXEC),
    "GLOBAL from memo": lambda: glob("os", "system") + put(900) + POP + get(900) + uni(SYSTEM) + TUPLE1 + REDUCE,
    "INST": lambda: MARK + uni(SYSTEM) + b"ios\nsystem\n",
    "OBJ": lambda: MARK + glob("os", "system") + uni(SYSTEM) + OBJ,
    "REDUCE then BUILD": lambda: system() + EMPTY_DICT + BUILD,
    "torch._utils._import_dotted_name": lambda: call(
        call(glob("torch._utils", "_import_dotted_name"), "os.system"), SYSTEM
    ),
    "STACK_GLOBAL": lambda: PROTO4 + short("os") + short("system") + STACK_GLOBAL + uni(SYSTEM) + TUPLE1 + REDUCE,
    "STACK_GLOBAL decoys popped": lambda: (
        PROTO4
        + short("os")
        + short("system")
        + short("torch")
        + short("Size")
        + POP
        + POP
        + STACK_GLOBAL
        + uni(SYSTEM)
        + TUPLE1
        + REDUCE
    ),
    "STACK_GLOBAL decoy tuple": lambda: (
        PROTO4
        + short("builtins")
        + short("exec")
        + MARK
        + short("collections")
        + short("OrderedDict")
        + TUPLE
        + POP
        + STACK_GLOBAL
        + uni(EXEC)
        + TUPLE1
        + REDUCE
    ),
    "STACK_GLOBAL memo swapped": lambda: (
        PROTO4
        + short("system")
        + put(901)
        + POP
        + short("os")
        + put(902)
        + POP
        + short("torch._utils")
        + short("_rebuild_tensor_v2")
        + POP
        + POP
        + get(902)
        + get(901)
        + STACK_GLOBAL
        + uni(SYSTEM)
        + TUPLE1
        + REDUCE
    ),
    "STACK_GLOBAL memo put on a non-string": lambda: (
        PROTO4
        + short("os")
        + EMPTY_TUPLE
        + put(903)
        + POP
        + short("system")
        + put(904)
        + POP
        + get(904)
        + STACK_GLOBAL
        + uni(SYSTEM)
        + TUPLE1
        + REDUCE
    ),
    "STACK_GLOBAL memo overwritten": lambda: (
        PROTO4
        + short("torch")
        + put(905)
        + POP
        + short("os")
        + put(905)
        + POP
        + short("Size")
        + put(906)
        + POP
        + short("system")
        + put(906)
        + POP
        + get(905)
        + get(906)
        + STACK_GLOBAL
        + uni(SYSTEM)
        + TUPLE1
        + REDUCE
    ),
    "STACK_GLOBAL from escaped STRING": lambda: (
        PROTO4 + b"S'\\x6fs'\n" + b"S'sy\\x73tem'\n" + STACK_GLOBAL + uni(SYSTEM) + TUPLE1 + REDUCE
    ),
    "STACK_GLOBAL POP_MARK decoys": lambda: (
        PROTO4
        + short("os")
        + short("system")
        + MARK
        + short("torch")
        + short("Size")
        + POP_MARK
        + STACK_GLOBAL
        + uni(SYSTEM)
        + TUPLE1
        + REDUCE
    ),
    "STACK_GLOBAL dotted name": lambda: (
        PROTO4 + short("torch.serialization") + short("os.system") + STACK_GLOBAL + uni(SYSTEM) + TUPLE1 + REDUCE
    ),
    "STACK_GLOBAL with MEMOIZE": lambda: (
        PROTO4
        + short("system")
        + MEMOIZE
        + POP
        + short("os")
        + MEMOIZE
        + short("torch")
        + MEMOIZE
        + POP
        + b"h\x00"
        + STACK_GLOBAL
        + uni(SYSTEM)
        + TUPLE1
        + REDUCE
    ),
}
# Imports off the list that do not run the payload (the scan must still refuse them).
REFUSED: dict[str, Callable[[], bytes]] = {
    "NEWOBJ of a class off the list": lambda: glob("collections", "UserDict") + EMPTY_TUPLE + NEWOBJ,
    "EXT1": lambda: b"\x82\x01",
    "STACK_GLOBAL of a safe name": lambda: (
        PROTO4 + short("collections") + short("OrderedDict") + STACK_GLOBAL + EMPTY_TUPLE + REDUCE
    ),
    "SETITEM on a tuple": lambda: EMPTY_TUPLE + uni("k") + uni("v") + SETITEM,
    "BUILD on a global": lambda: glob("collections", "OrderedDict") + EMPTY_DICT + BUILD,
    "REDUCE of a memo'd tuple": lambda: EMPTY_TUPLE + put(907) + POP + get(907) + EMPTY_TUPLE + REDUCE,
}
# Pickles torch's weights_only unpickler accepts.
SAFE: dict[str, Callable[[], bytes]] = {
    "OrderedDict": lambda: glob("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE,
    "OrderedDict with BUILD": lambda: glob("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE + EMPTY_DICT + BUILD,
    "set": lambda: glob("builtins", "set") + EMPTY_LIST + TUPLE1 + REDUCE,
    "torch.Size": lambda: glob("torch", "Size") + MARK + b"K\x02K\x03" + TUPLE + TUPLE1 + REDUCE,
    "dict": lambda: EMPTY_DICT + uni("a") + b"K\x01" + SETITEM,
}


# -- writing torch files by hand ------------------------------------------------------------------


def build_zip(records: list[tuple[str, bytes]], *, method: int = 0, flags: int = 0, sizes: dict[str, int] | None = None,
              methods: dict[str, int] | None = None) -> bytes:  # fmt: skip
    """A zip of ``records`` written byte by byte (so that any method, flag or size can be claimed)."""
    out = bytearray()
    central = bytearray()
    for name, data in records:
        raw = name.encode()
        m = (methods or {}).get(name, method)
        usize = (sizes or {}).get(name, len(data))
        crc = zlib.crc32(data) if m == 0 else 0
        offset = len(out)
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, flags, m, 0, 0x21, crc, len(data), usize, len(raw), 0)
        out += raw + data
        central += struct.pack(
            "<4s6H3L5H2L", b"PK\x01\x02", 20, 20, flags, m, 0, 0x21, crc, len(data), usize, len(raw), 0, 0, 0, 0, 0,
            offset,
        )  # fmt: skip
        central += raw
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(records), len(records), len(central), len(out), 0)
    return bytes(out + central + end)


def torch_records(obj: Any) -> list[tuple[str, bytes]]:
    """The records torch.save writes for ``obj`` (names under ``archive/``)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with zipfile.ZipFile(buffer) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def torch_records_bytes(obj: Any) -> bytes:
    """What torch.save itself writes (aligned records, data descriptors)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def zip_with_pickle(data_pkl: bytes, *, name: str = "archive/data.pkl", obj: Any = None) -> list[tuple[str, bytes]]:
    """torch's records for ``obj`` with data.pkl replaced (and renamed to ``name``)."""
    records = torch_records({} if obj is None else obj)
    return [(name, data_pkl) if n.endswith("/data.pkl") else (n, d) for n, d in records]


def splice(expr: bytes, real: bytes) -> bytes:
    """A protocol 2 pickle that evaluates ``expr``, drops it, then builds ``real``'s object as before."""
    assert real[:2] == PROTO2
    return PROTO2 + expr + POP + real[2:]


def nest(expr: bytes, real: bytes) -> bytes:
    """``real`` (a pickle of a dict, as torch.save writes it) with ``expr`` stored under one more key."""
    head = PROTO2 + EMPTY_DICT
    assert real.startswith(head + b"q\x00")
    return head + uni("extra") + expr + SETITEM + real[len(head) :]  # before the dict's memo entry: memo empty


def legacy_pickles(obj: Any) -> tuple[list[bytes], bytes]:
    """A legacy torch file of ``obj``: its five pickles and the raw storage bytes after them."""
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=False)
    data, pickles, start = buffer.getvalue(), [], 0
    stream = io.BytesIO(data)
    for _ in range(5):
        for opcode, _arg, _pos in pickletools.genops(stream):
            if opcode.name == "STOP":
                break
        pickles.append(data[start : stream.tell()])
        start = stream.tell()
    return pickles, data[start:]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def sample_obj(rng: random.Random) -> Any:
    """A random tree of tensors and plain values, as a training script would save it."""
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.bool, torch.complex64]

    def leaf() -> Any:
        kind = rng.randrange(9)
        if kind < 4:
            shape = tuple(rng.randrange(1, 4) for _ in range(rng.randrange(0, 3)))
            t = torch.zeros(shape, dtype=rng.choice(dtypes))
            return torch.nn.Parameter(t) if kind == 3 and t.is_floating_point() else t
        return rng.choice([rng.random(), rng.randrange(-5, 10**12), "text", None, True, b"raw", {1, 2}, 1 + 2j,
                           torch.Size([2, 3]), torch.float32, torch.device("cpu")])  # fmt: skip

    def tree(depth: int) -> Any:
        if depth == 0 or rng.random() < 0.3:
            return leaf()
        kind = rng.randrange(4)
        items = {f"k{i}": tree(depth - 1) for i in range(rng.randrange(1, 4))}
        if kind == 0:
            return items
        if kind == 1:
            return OrderedDict(items)
        return list(items.values()) if kind == 2 else tuple(items.values())

    return {"model": tree(3), "step": rng.randrange(1000)}


def no_marker(*dirs: Path) -> None:
    for d in dirs:
        assert not (d / MARKER).exists(), f"a payload ran: {d / MARKER}"


def finding_names(result: ScanResult) -> set[str]:
    return {f"{f.module}.{f.name}" for f in result.findings}


def refused_by_load(path: Path) -> type[Exception]:
    with pytest.raises(torchkeep.TorchkeepError) as err:
        torchkeep.load(path)
    return type(err.value)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run from a directory of tmp_path, so that a payload's MARKER would land there."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


# -- A: the emulated pickle machine ---------------------------------------------------------------

HIDDEN = {
    "STACK_GLOBAL decoys popped": ("os", "system"),
    "STACK_GLOBAL decoy tuple": ("builtins", "exec"),
    "STACK_GLOBAL memo swapped": ("os", "system"),
    "STACK_GLOBAL memo put on a non-string": ("os", "system"),
    "STACK_GLOBAL memo overwritten": ("os", "system"),
    "STACK_GLOBAL from escaped STRING": ("os", "system"),
    "STACK_GLOBAL POP_MARK decoys": ("os", "system"),
    "STACK_GLOBAL dotted name": ("torch.serialization", "os.system"),
    "STACK_GLOBAL with MEMOIZE": ("os", "system"),
}


@pytest.mark.parametrize("variant", sorted(HIDDEN))
def test_stack_global_names_the_real_global(tmp_path: Path, workdir: Path, variant: str) -> None:
    """Guard: STACK_GLOBAL takes its operands from the emulated stack and memo (not the last strings seen)."""
    module, name = HIDDEN[variant]
    path = write(tmp_path / "evil.pth", build_zip(zip_with_pickle(whole(RUNS[variant]()))))
    result = scan_file(str(path))
    assert (module, name) in result.globals
    assert any(f.module == module and f.name == name and f.dangerous for f in result.findings), result.findings
    assert refused_by_load(path) is torchkeep.UnsafeCheckpointError
    no_marker(workdir)


@pytest.mark.parametrize(
    "operands",
    [
        glob("builtins", "str") + EMPTY_TUPLE + REDUCE + short("system"),  # a str made by a call
        short("os") + glob("builtins", "str") + EMPTY_TUPLE + REDUCE,
        b"K\x01" + short("system"),  # not a string at all
        b"X" + struct.pack("<I", 5000) + b"o" * 5000 + short("system"),  # too long to keep
    ],
    ids=["module-from-a-call", "name-from-a-call", "int-module", "long-module"],
)
def test_stack_global_with_unknown_operands_is_a_finding(tmp_path: Path, operands: bytes) -> None:
    """Guard: a STACK_GLOBAL whose operands are not known statically is a dangerous finding, never clean."""
    result = scan_bytes(build_zip(zip_with_pickle(whole(PROTO4 + operands + STACK_GLOBAL))), "evil.pth")
    assert any(f.name == "STACK_GLOBAL" and f.dangerous for f in result.findings), result.findings
    assert not result.ok


@pytest.mark.parametrize(
    ("opcode", "expr", "words"),
    [
        ("REDUCE", EMPTY_TUPLE + put(1) + POP + get(1) + EMPTY_TUPLE + REDUCE, "REDUCE calls a tuple, not a named"),
        ("NEWOBJ", uni("x") + EMPTY_TUPLE + NEWOBJ, "NEWOBJ calls a string, not a named global"),
        ("OBJ", MARK + uni("x") + OBJ, "OBJ calls a string, not a named global"),
        (
            "BUILD",
            glob("torch._utils", "_rebuild_tensor_v2") + EMPTY_DICT + BUILD,
            "torch._utils._rebuild_tensor_v2 itself",
        ),
        ("BINPERSID", MARK + uni("module") + glob("builtins", "set") + TUPLE + BINPERSID, "loads the persistent id"),
    ],
    ids=["reduce", "newobj", "obj", "build-on-a-global", "persistent-id"],
)
def test_calls_build_and_persistent_ids_off_the_rules_are_findings(opcode: str, expr: bytes, words: str) -> None:
    """Guards: a call of anything but a named global (REDUCE, NEWOBJ, OBJ), BUILD on a global itself (it would
    change that function or class for the whole process), a persistent id other than torch's ('storage', ...)."""
    result = scan_bytes(build_zip(zip_with_pickle(whole(expr))), "evil.pth")
    hits = [f for f in result.findings if f.module == "<pickle>" and f.name == opcode and words in f.reason]
    assert hits, result.findings
    assert hits[0].dangerous == (opcode != "BINPERSID")


def test_the_old_tar_format_is_recognised_before_anything_else(tmp_path: Path, workdir: Path) -> None:
    """Guard: a file torch.load would open as its old tar format (it tries that first) is refused as such, even
    when its first bytes are also a clean pickle."""
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, content in (("}.", b""), ("storages", whole(system()))):
            member = tarfile.TarInfo(name)
            member.size = len(content)
            archive.addfile(member, io.BytesIO(content))
    path = write(tmp_path / "old.pth", tar.getvalue())
    assert pickle.loads(path.read_bytes()) == {}  # read as a pickle, its first bytes are a clean one
    result = scan_file(str(path))
    assert result.kind == "torch-tar" and not result.ok
    assert any("old tar format" in f.reason for f in result.findings)
    assert refused_by_load(path) is torchkeep.UnsafeCheckpointError
    no_marker(workdir)


def test_torch_utils_is_allowed_one_rebuild_function_at_a_time(tmp_path: Path, workdir: Path) -> None:
    """Guard: the allow-list is torch's weights_only list of exact names, not the whole torch._utils module."""
    allowed = {f"{m}.{n}" for m, n in scan_module._SAFE_GLOBALS}
    assert allowed == set(torch._weights_only_unpickler._get_allowed_globals())
    path = write(tmp_path / "evil.pth", build_zip(zip_with_pickle(whole(RUNS["torch._utils._import_dotted_name"]()))))
    result = scan_file(str(path))
    assert "torch._utils._import_dotted_name" in finding_names(result)
    assert [f.dangerous for f in result.findings if f.name == "_import_dotted_name"] == [True]
    for name in ("_rebuild_from_type", "_flatten_dense_tensors", "_take_tensors"):
        assert not scan_bytes(whole(glob("torch._utils", name))).ok
    with pytest.raises(torchkeep.UnsafeCheckpointError, match=r"torch\._utils\._import_dotted_name"):
        torchkeep.load(path)
    no_marker(workdir)


@pytest.mark.parametrize("name", ["archive/DATA.PKL", "archive/Data.pkl", "archive/data.PKL"])
def test_data_pkl_is_found_whatever_its_case(tmp_path: Path, workdir: Path, name: str) -> None:
    """Guard: every *.pkl record is scanned, matched without regard to case (as torch's zip reader does)."""
    path = write(tmp_path / "evil.pth", build_zip(zip_with_pickle(whole(system()), name=name)))
    reader = torch._C.PyTorchFileReader(str(path))
    assert b"system" in bytes(reader.get_record("data.pkl"))  # torch loads this record as data.pkl
    result = scan_file(str(path))
    assert "os.system" in finding_names(result)
    assert refused_by_load(path) is torchkeep.UnsafeCheckpointError
    no_marker(workdir)


def test_zip_without_the_pickle_torch_loads_is_not_clean(tmp_path: Path) -> None:
    """Guard: a torch zip with no data.pkl torch would load is corrupt, not clean."""
    records = [(n.replace("data.pkl", "data.pkx"), d) for n, d in torch_records({"w": torch.ones(2)})]
    path = write(tmp_path / "none.pth", build_zip(records))
    result = scan_file(str(path))
    assert not result.ok and any("no data.pkl" in e for e in result.errors), result.errors
    with pytest.raises(torchkeep.CorruptCheckpointError, match=r"no data\.pkl"):
        torchkeep.load(path)


def test_records_differing_only_in_case_are_refused(tmp_path: Path) -> None:
    """Guard: records whose names differ only in case are refused (torch would pick one of them)."""
    records = torch_records({"w": torch.ones(2)})
    records.insert(1, ("archive/DATA.PKL", whole(system())))
    result = scan_bytes(build_zip(records), "evil.pth")
    assert any("several records named 'archive/data.pkl'" in e for e in result.errors), result.errors


def shifted_zip() -> bytes:
    """A zip whose directory Python and torch find in different places: Python sees a clean data.pkl, torch an
    evil one. Python shifts every offset by the bytes it believes were prepended; torch does not."""
    evil = zip_with_pickle(whole(system()))
    clean = zip_with_pickle(whole(SAFE["dict"]()))
    first = build_zip(evil)
    cd_evil_at = struct.unpack("<L", first[-6:-2])[0]
    evil_local, cd_evil = first[:cd_evil_at], first[cd_evil_at:-22]
    # The clean records follow, then torch's directory (for the evil ones), then Python's (for the clean ones).
    second = build_zip(clean)
    cd_clean_at = struct.unpack("<L", second[-6:-2])[0]
    clean_local, cd_clean = second[:cd_clean_at], second[cd_clean_at:-22]
    shift = len(cd_evil)
    evil_local += bytes(shift)  # room, so that the offsets Python is told stay positive
    base = len(evil_local)
    rebased = bytearray()
    i = 0
    while i < len(cd_clean):  # Python adds `shift` to each offset: store offsets that land on the clean records
        fixed = bytearray(cd_clean[i : i + 46])
        name_len, extra_len, comment_len = struct.unpack("<3H", fixed[28:34])
        offset = struct.unpack("<L", fixed[42:46])[0]
        fixed[42:46] = struct.pack("<L", base + offset - shift)
        rebased += fixed + cd_clean[i + 46 : i + 46 + name_len + extra_len + comment_len]
        i += 46 + name_len + extra_len + comment_len
    assert len(cd_evil) <= len(rebased)
    body = evil_local + clean_local + cd_evil + bytes(rebased)
    end = struct.pack(
        "<4s4H2LH", b"PK\x05\x06", 0, 0, len(evil), len(evil), len(rebased), len(evil_local + clean_local), 0
    )
    return body + end


def test_zip_read_differently_by_python_and_torch_is_refused(tmp_path: Path, workdir: Path) -> None:
    """Guard: the zip directory must sit where its end record says (no shift), else torch is not even opened."""
    path = write(tmp_path / "shifted.pth", shifted_zip())
    with zipfile.ZipFile(path) as archive:  # Python's view: clean
        assert b"system" not in archive.read("archive/data.pkl")
    assert b"system" in bytes(torch._C.PyTorchFileReader(str(path)).get_record("data.pkl"))  # torch's: evil
    result = scan_file(str(path))
    assert any("bytes away from where its end record says" in e for e in result.errors), result.errors
    assert refused_by_load(path) is torchkeep.CorruptCheckpointError
    no_marker(workdir)


def test_torch_and_python_views_are_compared_record_by_record(tmp_path: Path, monkeypatch: Any) -> None:
    """Guard: the records torch's reader sees are compared with Python's (here with the shift check off)."""
    monkeypatch.setattr(scan_module, "_zip_directory_shift", lambda archive: 0)
    result = scan_bytes(shifted_zip(), "shifted.pth")
    assert any("see different records" in e for e in result.errors), (result.errors, result.findings)


def test_torchs_own_check_is_a_second_opinion(tmp_path: Path, monkeypatch: Any) -> None:
    """Guard: whatever torch.serialization.get_unsafe_globals_in_checkpoint names is reported, even if the
    scan's own list (blinded here) let it through."""
    monkeypatch.setattr(scan_module, "_is_safe", lambda module, name: True)
    result = scan_bytes(build_zip(zip_with_pickle(whole(system()))), "evil.pth")
    assert "os.system" in finding_names(result)
    assert any("get_unsafe_globals_in_checkpoint" in f.reason for f in result.findings)


def mutations(data: bytes, rng: random.Random) -> bytes:
    """``data`` damaged at random: flipped bytes, a truncation, a zip field set to 0 or 0xFFFFFFFF, a slice doubled
    or cut out."""
    out = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:
        for _ in range(rng.randrange(1, 5)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del out[rng.randrange(len(out)) :]
    elif kind == 2:
        at = rng.randrange(len(out) - 4)
        out[at : at + 4] = rng.choice([b"\0\0\0\0", b"\xff\xff\xff\xff", b"\xff\xff\0\0"])
    elif kind == 3:
        a = rng.randrange(len(out))
        b = min(len(out), a + rng.randrange(1, 200))
        out[b:b] = out[a:b]
    else:  # a hole: every offset after it is wrong
        a = rng.randrange(len(out))
        del out[a : a + rng.randrange(1, 64)]
    return bytes(out)


def test_damaged_torch_files_never_escape_as_untyped_errors(tmp_path: Path, workdir: Path) -> None:
    """Guards: every read the scan makes is bounded and checked (offsets, sizes, truncation), so damage gives
    a scan error or a typed error, never an exception of another kind, and never runs anything."""
    rng = random.Random(7)
    bases = [
        build_zip(torch_records(sample_obj(rng))),
        torch_records_bytes(sample_obj(rng)),
        b"".join(legacy_pickles(sample_obj(rng))[0]) + legacy_pickles(sample_obj(rng))[1],
        build_zip(zip_with_pickle(nest(RUNS["STACK_GLOBAL memo swapped"](), whole(EMPTY_DICT)[:-1] + b"q\x00" + STOP))),
    ]
    for i in range(400):
        data = mutations(rng.choice(bases), rng)
        path = write(tmp_path / f"damaged{i}.pth", data)
        result = scan_file(str(path))
        assert isinstance(result, ScanResult)
        assert scan_bytes(data, str(path)).ok == result.ok
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torchkeep.load(path)
        except torchkeep.TorchkeepError:
            pass
        else:
            assert result.ok, f"damaged{i}.pth loaded though the scan refused it: {result}"
        no_marker(workdir)


# -- B: compressed records are never inflated ------------------------------------------------------

BOMB_CHECK = textwrap.dedent(
    """
    import json, resource, sys, warnings
    import torchkeep
    from torchkeep.scan import scan_file
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {}
    for path in sys.argv[1:]:
        result = scan_file(path)
        out[path] = {"ok": result.ok, "errors": result.errors}
        for call in (torchkeep.load, torchkeep.verify):
            try:
                call(path)
                out[path][call.__name__] = "loaded"
            except torchkeep.TorchkeepError as err:
                out[path][call.__name__] = type(err).__name__ + ": " + str(err)
    out["growth_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps(out))
    """
)


def deflate_bomb(nbytes: int) -> bytes:
    """A raw deflate stream of ``nbytes`` zero bytes, made without compressing them all."""
    chunk = bytes(64 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    body = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)  # after a full flush every chunk compresses the same
    return head + body * (nbytes // len(chunk) - 1) + c.flush()


@pytest.mark.slow
def test_deflate_bombs_are_refused_in_bounded_memory(tmp_path: Path) -> None:
    """Guard: every record must be stored uncompressed, checked before torch's reader opens the zip (which
    inflates records as it opens) and before anything else reads it."""
    size = 1 << 30
    bomb = deflate_bomb(size)
    records = torch_records({"w": torch.ones(2)})
    files = {}
    for target in ("data.pkl", "version"):
        recs = [(n, bomb if n.endswith("/" + target) else d) for n, d in records]
        name = next(n for n, _ in recs if n.endswith("/" + target))
        data = build_zip(recs, methods={name: 8}, sizes={name: size})
        assert len(data) < 2 << 20
        files[target] = write(tmp_path / f"bomb-{target.replace('.', '-')}.pth", data)
    proc = subprocess.run(
        [sys.executable, "-c", BOMB_CHECK, *map(str, files.values())],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["growth_mib"] < 256, out["growth_mib"]  # a GiB stays compressed
    for path in map(str, files.values()):
        assert not out[path]["ok"]
        assert any("deflate compression" in e for e in out[path]["errors"]), out[path]
        for call in ("load", "verify"):
            assert out[path][call].startswith("CorruptCheckpointError"), out[path][call]
            assert "deflate compression" in out[path][call] and "inflate" in out[path][call]


# -- C: methods torch cannot read, encryption -----------------------------------------------------


@pytest.mark.parametrize(
    ("method", "flags", "words"),
    [
        (8, 0, "deflate compression"),
        (12, 0, "bzip2 compression"),
        (14, 0, "lzma compression"),
        (99, 0, "unknown compression method (99)"),
        (77, 0, "unknown compression method (77)"),
        (0, 1, "is encrypted"),
    ],
    ids=["deflate", "bzip2", "lzma", "aes", "unknown", "encrypted"],
)
def test_unreadable_records_give_typed_errors(tmp_path: Path, capsys: Any, method: int, flags: int, words: str) -> None:
    """Guard: records that are compressed (any method) or encrypted are refused with a typed error, in load,
    verify and scan alike (torch.save writes neither)."""
    records = torch_records({"w": torch.ones(2)})
    if method == 8:
        records = [(n, zlib.compress(d)[2:-4]) for n, d in records]
    elif method == 12:
        import bz2

        records = [(n, bz2.compress(d)) for n, d in records]
    path = write(tmp_path / "odd.pth", build_zip(records, method=method, flags=flags))
    for call in (torchkeep.load, torchkeep.verify, torchkeep.inspect):
        with pytest.raises(torchkeep.CorruptCheckpointError, match=re.escape(words)):
            call(path)
    result = scan_file(str(path))
    assert not result.ok and any(words in e for e in result.errors), result.errors
    code = cli_main(["scan", str(path)])
    out, err = capsys.readouterr()
    assert code == 1 and "error" in out and words in out and "Traceback" not in out + err


# -- D: FIFOs and devices --------------------------------------------------------------------------


def finishes(fn: Callable[[], Any], unblock: Callable[[], None], seconds: float = 20) -> BaseException | None:
    """Run ``fn`` in a thread; fail if it blocks (after unblocking it); return what it raised."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        unblock()
        thread.join(10)
        pytest.fail(f"{fn} blocked")
    return outcome[0]


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """Guard: the file is opened with O_NONBLOCK and must be a regular file (fstat S_ISREG) before reading."""
    fifo = tmp_path / "pipe.pth"
    os.mkfifo(fifo)

    def unblock() -> None:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)

    storage = LocalStorage(tmp_path)
    calls: list[Callable[[], Any]] = [
        lambda: scan_file(str(fifo)),
        lambda: load_pth(storage, "pipe.pth", zip_format=True, map_location="cpu"),
        lambda: crc_check(storage, "pipe.pth"),
    ]
    for fn in calls:
        error = finishes(fn, unblock)
        assert isinstance(error, torchkeep.CorruptCheckpointError), error
        assert "FIFO" in str(error) and "not a regular file" in str(error)


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
def test_a_device_is_refused_without_reading_it(tmp_path: Path, device: str) -> None:
    """Guard: a character device (directly, or through a link named .pth) is not a regular file: refused."""
    if not os.path.exists(device):
        pytest.fail(f"{device} is missing on this machine")
    link = tmp_path / "dev.pth"
    link.symlink_to(device)
    storage = LocalStorage(tmp_path)
    calls: list[Callable[[], Any]] = [
        lambda: scan_file(device),
        lambda: scan_file(str(link)),
        lambda: load_pth(storage, "dev.pth", zip_format=True, map_location="cpu"),
        lambda: torchkeep.load(link),
    ]
    for fn in calls:
        error = finishes(fn, lambda: None)
        assert isinstance(error, torchkeep.CorruptCheckpointError), error
        assert "character device" in str(error) or "not a regular file" in str(error)


# -- E: a disk that fills up under torch.save -----------------------------------------------------


class FailingStorage(LocalStorage):
    """A local disk whose ``fail_at``-th file write of the next save fails: with OSError ``error`` after
    writing half the bytes; or, for ``SHORT``, by writing half and saying so (the next write goes on); or,
    for ``STUCK``, by writing nothing from then on; or, for ``BELOW`` (ENOSPC), in the operating system's write
    under the storage's own file (which words it as a StorageError first)."""

    SHORT, STUCK, BELOW = 0, -1, -2

    def __init__(self, root: Path, fail_at: int, error: int) -> None:
        super().__init__(root)
        self.fail_at, self.error, self.calls = fail_at, error, 0
        self.injected: OSError | None = None

    def begin(self, key: str, *, directory: bool) -> Any:
        txn = super().begin(key, directory=directory)
        original = txn.open
        storage = self

        def open_failing(name: str = "") -> Any:
            f = original(name)
            if storage.error == storage.BELOW:
                f.__class__ = _below(type(f), storage)
                return f
            real_write = f.write

            def write(data: Any) -> int:
                storage.calls += 1
                if storage.error == storage.STUCK and storage.calls >= storage.fail_at > 0:
                    return 0
                if storage.calls != storage.fail_at:
                    return real_write(data)
                view = memoryview(data).cast("B")
                if storage.error == storage.SHORT:
                    return real_write(view[: max(1, len(view) // 2)])
                real_write(view[: len(view) // 2])
                storage.injected = OSError(storage.error, os.strerror(storage.error))
                raise storage.injected

            f.write = write
            return f

        txn.open = open_failing
        return txn


def _below(durable: type, storage: FailingStorage) -> type:
    """``durable`` (the storage's file class) over a raw file whose ``fail_at``-th write hits a full disk."""

    class Disk(io.FileIO):
        def write(self, data: Any) -> int:
            storage.calls += 1
            if storage.calls == storage.fail_at:
                storage.injected = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                raise storage.injected
            return super().write(data)

    return type("FullDisk", (durable, Disk), {})


def pth_save_writes(tmp_path: Path, obj: Any) -> int:
    counter = FailingStorage(tmp_path / "count", fail_at=-1, error=errno.EIO)
    torchkeep.save(obj, "ckpt.pth", storage=counter)
    return counter.calls


OLD, NEW = {"w": torch.zeros(4)}, {"w": torch.ones(300, 30), "x": [torch.ones(3)] * 3, "n": 6}


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (errno.ENOSPC, "the disk is full"),
        (errno.EIO, os.strerror(errno.EIO)),
        (FailingStorage.STUCK, "the storage stopped accepting bytes"),
        (FailingStorage.BELOW, "the disk is full"),
    ],
    ids=["ENOSPC", "EIO", "stuck", "ENOSPC-under-the-storage"],
)
def test_a_failing_disk_under_torch_save_is_a_storage_error(tmp_path: Path, error: int, reason: str) -> None:
    """Guard: write_pth turns what torch raises when the file fails under it (a RuntimeError wrapping the
    OSError, or the OSError) into StorageError naming the file; the transaction leaves nothing behind."""
    torchkeep.save(OLD, tmp_path / "ckpt.pth")
    writes = pth_save_writes(tmp_path, NEW)
    assert writes >= 10
    target = str(tmp_path / "ckpt.pth")
    for fail_at in range(1, writes + 1):
        storage = FailingStorage(tmp_path, fail_at=fail_at, error=error)
        with pytest.raises(torchkeep.StorageError) as err:
            torchkeep.save(NEW, "ckpt.pth", storage=storage)
        assert reason in str(err.value) and target in str(err.value), (fail_at, str(err.value))
        assert err.value.path == target and "tk-staging" not in str(err.value)
        assert str(err.value).count(reason) == 1  # said once, not once per layer
        if error > 0 or error == FailingStorage.BELOW:
            assert storage.injected in causes(err.value)  # the fault at this very write, not another failure
        assert sorted(os.listdir(tmp_path)) == ["ckpt.pth", "count"], fail_at  # no staging left behind
        assert torch.equal(torchkeep.load(tmp_path / "ckpt.pth")["w"], OLD["w"])


def test_a_short_write_under_torch_save_never_leaves_a_hole(tmp_path: Path) -> None:
    """Guard: torch ignores what write() returns; write_pth writes the rest of a short write itself."""
    writes = pth_save_writes(tmp_path, NEW)
    for fail_at in range(1, writes + 1):
        torchkeep.save(NEW, "ckpt.pth", storage=FailingStorage(tmp_path, fail_at=fail_at, error=FailingStorage.SHORT))
        loaded = torchkeep.load(tmp_path / "ckpt.pth")
        assert torch.equal(loaded["w"], NEW["w"]) and loaded["n"] == 6, fail_at


# -- F: the scan against what torch really does ----------------------------------------------------

FULL_LOAD = textwrap.dedent(
    """
    import json, os, sys, warnings
    import torch
    warnings.simplefilter("ignore")
    ran = {}
    for i, path in enumerate(json.load(open(sys.argv[1]))):
        where = os.path.join(sys.argv[2], str(i))
        os.makedirs(where)
        os.chdir(where)
        try:
            torch.load(path, weights_only=False)
        except BaseException:
            pass
        ran[path] = os.path.exists(os.path.join(where, "MARKER"))
    print(json.dumps(ran))
    """
)


def corpus(root: Path) -> dict[Path, str]:
    """Torch files to compare the scan with torch on, each with what it was made to be."""
    rng = random.Random(20240611)
    root.mkdir()
    files: dict[Path, str] = {}

    def add(label: str, data: bytes, suffix: str = ".pth") -> None:
        files[write(root / f"{len(files):03d}{suffix}", data)] = label

    # Checkpoints as torch.save writes them: zip and legacy, protocol 2 (clean) and 4 (refused).
    for i in range(60):
        obj = sample_obj(rng)
        buffer = io.BytesIO()
        torch.save(obj, buffer, _use_new_zipfile_serialization=i % 3 != 0, pickle_protocol=4 if i % 10 == 9 else 2)
        add("torch.save", buffer.getvalue())
    real = [torch_records(sample_obj(rng)) for _ in range(3)]
    legacy = [legacy_pickles(sample_obj(rng)) for _ in range(3)]
    kinds = {**{k: ("runs", v) for k, v in RUNS.items()}, **{k: ("refused", v) for k, v in REFUSED.items()},
             **{k: ("safe", v) for k, v in SAFE.items()}}  # fmt: skip
    for label, (kind, expr) in kinds.items():
        real_zip = rng.choice(real)
        pickles, raw = rng.choice(legacy)
        add(f"{kind}: {label} alone in data.pkl", build_zip(zip_with_pickle(whole(expr()))))
        add(f"{kind}: {label} spliced (POP) into a checkpoint's data.pkl",
            build_zip([(n, splice(expr(), d) if n.endswith("/data.pkl") else d) for n, d in real_zip]))  # fmt: skip
        add(f"{kind}: {label} nested in a checkpoint's data.pkl",
            build_zip([(n, nest(expr(), d) if n.endswith("/data.pkl") else d) for n, d in real_zip]))  # fmt: skip
        nested = [nest(expr(), p) if j == 3 else p for j, p in enumerate(pickles)]
        add(f"{kind}: {label} nested in a legacy checkpoint", b"".join(nested) + raw)
        add(f"{kind}: {label} in DATA.PKL", build_zip(zip_with_pickle(whole(expr()), name="archive/DATA.PKL")))
        which = rng.randrange(5)
        hidden = [splice(expr(), p) if j == which else p for j, p in enumerate(pickles)]
        add(f"{kind}: {label} spliced (POP) into legacy pickle {which}", b"".join(hidden) + raw)
        if kind == "runs":
            deflated = [(n, zlib.compress(d)[2:-4]) if n.endswith("/data.pkl") else (n, d)
                        for n, d in zip_with_pickle(whole(expr()))]  # fmt: skip
            add(f"{kind}: {label} in a deflated data.pkl",
                build_zip(deflated, methods={"archive/data.pkl": 8},
                          sizes={"archive/data.pkl": len(whole(expr()))}))  # fmt: skip
            tar = io.BytesIO()
            with tarfile.open(fileobj=tar, mode="w", format=tarfile.PAX_FORMAT) as archive:
                member = tarfile.TarInfo("storages")
                content = whole(expr())
                member.size = len(content)
                archive.addfile(member, io.BytesIO(content))
            add(f"{kind}: {label} in the old tar format", tar.getvalue())
    add("runs: a zip torch and Python read differently", shifted_zip())
    add("safe: a plain checkpoint", build_zip(torch_records({"w": torch.ones(3)})))
    return files


def weights_only_loads(path: Path) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(path, weights_only=True)
    except Exception:
        return False
    return True


@pytest.mark.slow
def test_the_scan_agrees_with_what_torch_does(tmp_path: Path, workdir: Path) -> None:
    """Differential. Guards: all of the scan. For every file: if a full unpickle (torch.load(weights_only=False),
    in a throwaway process) runs the payload, the scan is not clean; if the scan is clean, torch's weights_only
    load succeeds; and torchkeep.load either loads it or raises a typed error, running nothing."""
    files = corpus(tmp_path / "corpus")
    assert len(files) >= 200
    listing = tmp_path / "files.json"
    listing.write_text(json.dumps([str(p) for p in files]))
    (tmp_path / "markers").mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", FULL_LOAD, str(listing), str(tmp_path / "markers")],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = {Path(p): r for p, r in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    problems, counts = [], {"ran": 0, "clean": 0, "refused": 0}
    for path, label in files.items():
        result = scan_file(str(path))
        counts["clean" if result.ok else "refused"] += 1
        counts["ran"] += ran[path]
        if ran[path] and result.ok:
            problems.append(f"{path.name} ({label}): code ran under torch.load, yet the scan is clean")
        if result.ok and not weights_only_loads(path):
            problems.append(f"{path.name} ({label}): the scan is clean, yet weights_only torch.load fails")
        if label.startswith("runs:") and not ran[path]:
            problems.append(f"{path.name} ({label}): the payload was meant to run under torch.load and did not")
        if label.startswith(("runs:", "refused:")) and result.ok:
            problems.append(f"{path.name} ({label}): made to be refused, yet the scan is clean")
        if label.startswith("safe:") and "(POP)" not in label and not result.ok:  # weights_only refuses POP
            problems.append(f"{path.name} ({label}): made to be clean, yet the scan refuses it: {result}")
        try:
            torchkeep.load(path)
            if not result.ok:
                problems.append(f"{path.name} ({label}): torchkeep.load loaded it though the scan refuses it")
        except torchkeep.TorchkeepError as err:
            if result.ok:
                problems.append(f"{path.name} ({label}): the scan is clean, yet torchkeep.load refused it: {err}")
        no_marker(workdir)
    assert not problems, "\n".join(problems)
    assert counts["ran"] >= 150 and counts["clean"] >= 70 and counts["refused"] >= 180, counts


def test_pickle_protocol_and_the_cli_report(tmp_path: Path, capsys: Any) -> None:
    """A torch.save at protocol 4 needs full unpickling (weights_only refuses its opcodes): unsafe, and said so."""
    torch.save({"w": torch.ones(2)}, tmp_path / "p4.pth", pickle_protocol=4)
    result = scan_file(str(tmp_path / "p4.pth"))
    assert not result.ok and not result.errors and {f.name for f in result.findings} >= {"STACK_GLOBAL", "MEMOIZE"}
    assert not weights_only_loads(tmp_path / "p4.pth")
    with pytest.raises(torchkeep.UnsafeCheckpointError, match="weights_only unpickler refuses"):
        torchkeep.load(tmp_path / "p4.pth")
    with pytest.warns(UserWarning, match="full unpickling"):
        assert torch.equal(torchkeep.load(tmp_path / "p4.pth", trust=True)["w"], torch.ones(2))
    assert pickle.loads(whole(SAFE["dict"]())) == {"a": 1}  # the hand-written pickles are real pickles
