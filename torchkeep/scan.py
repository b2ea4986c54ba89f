"""Static inspection of pickle-based files: every global a file would import, without running it.

``torch.save`` files (zip or legacy), ``.bin``/``.ckpt`` files and plain
pickles are walked opcode by opcode with the standard library's
``pickletools``; nothing is unpickled. A global that is not on the list of
what torch's own tensor files need is reported, and the known ways to run
code (``os.system``, ``builtins.eval``, ``subprocess.*``, ...) are marked
dangerous.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from dataclasses import dataclass, field

from torchkeep.errors import CheckpointNotFoundError

__all__ = ["ScanFinding", "ScanResult", "scan_bytes", "scan_file"]

_SAFE_MODULE_NAMES = {
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("builtins", "slice"),
    ("_codecs", "encode"),  # how protocol 2 pickles bytes
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "dtype"),
    ("torch.nn.parameter", "Parameter"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.serialization", "_get_layout"),
}
_SAFE_MODULES = {"torch._utils"}  # _rebuild_tensor_v2, _rebuild_parameter, ...
_DANGEROUS_MODULES = {
    "os", "posix", "nt", "subprocess", "sys", "socket", "shutil", "runpy", "importlib", "pty",
    "webbrowser", "ctypes", "multiprocessing", "code", "pickle", "marshal",
}  # fmt: skip
_DANGEROUS_BUILTINS = {"eval", "exec", "compile", "open", "__import__", "getattr", "setattr", "delattr",
                       "globals", "locals", "vars", "input", "breakpoint"}  # fmt: skip


@dataclass(frozen=True)
class ScanFinding:
    """One global a pickle imports that is not on the safe list."""

    module: str
    name: str
    dangerous: bool
    where: str

    def __str__(self) -> str:
        return f"{'DANGEROUS ' if self.dangerous else ''}{self.module}.{self.name} (in {self.where})"


@dataclass
class ScanResult:
    """What a scan of one file found. ``ok`` when no global off the safe list was found."""

    path: str
    pickles: int = 0
    globals: set[tuple[str, str]] = field(default_factory=set)
    findings: list[ScanFinding] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings and not self.errors


def _is_safe(module: str, name: str) -> bool:
    if (module, name) in _SAFE_MODULE_NAMES or module in _SAFE_MODULES:
        return True
    # torch dtypes and storage classes: torch.float32, torch.FloatStorage, ...
    return module == "torch" and (name.endswith("Storage") or name in _TORCH_DTYPES)


def _dangerous(module: str, name: str) -> bool:
    root = module.split(".")[0]
    return root in _DANGEROUS_MODULES or (root in ("builtins", "__builtin__") and name in _DANGEROUS_BUILTINS)


_TORCH_DTYPES = {
    "float16", "float32", "float64", "bfloat16", "half", "float", "double", "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64", "bool", "complex32", "complex64", "complex128", "long", "int", "short",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2",
    "cfloat", "cdouble", "chalf",
}  # fmt: skip


def _walk(data: bytes, where: str, result: ScanResult) -> None:
    """Walk every pickle in ``data`` (a legacy torch file holds several, then raw bytes)."""
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        start = stream.tell()
        strings: list[str] = []
        memo: dict[int, str] = {}
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                name = opcode.name
                if isinstance(arg, str) and name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
                                                     "STRING", "BINSTRING", "SHORT_BINSTRING"):  # fmt: skip
                    strings.append(arg)
                elif name == "MEMOIZE" and strings:
                    memo[len(memo)] = strings[-1]
                elif name in ("BINPUT", "LONG_BINPUT", "PUT") and strings and arg is not None:
                    memo[int(arg)] = strings[-1]
                elif name in ("BINGET", "LONG_BINGET", "GET") and arg is not None and int(arg) in memo:
                    strings.append(memo[int(arg)])
                elif name in ("GLOBAL", "INST"):
                    module, _, attr = str(arg).partition(" ")
                    result.globals.add((module, attr))
                elif name == "STACK_GLOBAL":
                    module, attr = (strings[-2], strings[-1]) if len(strings) >= 2 else ("?", "?")
                    result.globals.add((module, attr))
        except Exception as exc:  # pickletools raises ValueError and others on bytes that are not a pickle
            if stream.tell() == start or (start == 0 and result.pickles == 0):
                result.errors.append(f"{where}: not a readable pickle at byte {start} ({exc})")
            return  # the raw tensor bytes after a legacy file's pickles
        result.pickles += 1
        if stream.tell() == start:
            return
    return


def scan_bytes(data: bytes, path: str = "<bytes>") -> ScanResult:
    """Scan a pickle-based file's bytes (a torch zip, a legacy torch file, or a plain pickle)."""
    result = ScanResult(path=path)
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for info in archive.infolist():
                    if info.filename.endswith(".pkl"):
                        _walk(archive.read(info), f"{path}:{info.filename}", result)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            result.errors.append(f"{path}: not a readable zip archive ({exc})")
    else:
        _walk(data, path, result)
    _judge(result, path)
    return result


def _judge(result: ScanResult, path: str) -> None:
    for module, name in sorted(result.globals):
        if not _is_safe(module, name):
            result.findings.append(ScanFinding(module, name, _dangerous(module, name), path))


def scan_file(path: str) -> ScanResult:
    """Scan a file on disk; see :func:`scan_bytes`. Of a torch zip only the pickles are read."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                f.seek(0)
                return scan_bytes(f.read(), path)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"No file at {path!r}.", path=path) from None
    result = ScanResult(path=path)
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.filename.endswith(".pkl"):
                    _walk(archive.read(info), f"{path}:{info.filename}", result)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        result.errors.append(f"{path}: not a readable zip archive ({exc})")
    _judge(result, path)
    return result
