"""Static inspection of pickle-based files: every global a file would import, without running it.

``torch.save`` files (zip or legacy), ``.bin``/``.ckpt`` files and plain
pickles are read opcode by opcode by an emulation of the pickle machine (its
stack, marks and memo, as CPython's ``_pickle`` keeps them); nothing is
unpickled. The scan reads exactly what ``torch.load`` would read:

- of a torch zip, the records as torch's own zip reader sees them (Python's
  view and torch's are compared, record by record), and every ``*.pkl``
  record whatever the case of its name (torch finds ``data.pkl``
  case-insensitively); a zip without the ``data.pkl`` torch would load, or
  with compressed or encrypted records (``torch.save`` writes neither), is
  not clean;
- of a legacy file, its five pickles; of anything else, its pickles one after
  another.

A file is clean only when torch's ``weights_only`` unpickler would accept every
opcode and every global in it: a global off that unpickler's allow-list (the
exact names, e.g. single rebuild functions of ``torch._utils``) is a finding,
and so are a ``STACK_GLOBAL`` whose operands cannot be known statically, a call
of anything but a named global, and opcodes or uses the ``weights_only``
unpickler refuses. The known ways to run code (``os.system``,
``builtins.eval``, ``subprocess.*``, ...) are marked dangerous. For torch zips,
torch's own ``get_unsafe_globals_in_checkpoint`` is asked too, and whatever it
names is reported.

Memory stays bounded: records are streamed, long strings are skipped rather
than kept, and the emulated stack and memo are capped.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import io
import os
import stat
import struct
import tarfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError, StorageError

__all__ = [
    "ScanFinding",
    "ScanResult",
    "open_regular_file",
    "scan_bytes",
    "scan_descriptor",
    "scan_file",
    "zip_record_problem",
]

# torch's legacy (non-zip) files open with its magic number pickled at protocol 2.
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_LEGACY_PICKLES = 5  # magic number, protocol version, sys info, the object, the storage keys

_MAX_KEPT_STRING = 1024  # longer strings are skipped, not kept: no module or class name is that long
_MAX_KEPT_TOTAL = 32 << 20  # characters of strings kept per file
_MAX_ITEMS = 1 << 21  # emulated stack items, marks and memo entries per pickle
_MAX_LINE = 1 << 16  # the longest line of a text opcode
_MAX_FINDINGS = 1000  # per file
_SECOND_OPINION_LIMIT = 64 << 20  # torch's own scan reads data.pkl whole; only for records up to this size
_CHUNK = 1 << 16


def _weights_only_allowed() -> frozenset[tuple[str, str]]:
    """The globals torch's ``weights_only`` unpickler allows by default, as (module, name) pairs."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        names = list(_get_allowed_globals())
    except Exception:  # a torch without the private table: the names torch's own files need
        names = [
            "collections.OrderedDict", "collections.Counter", "torch.nn.parameter.Parameter",
            "torch.serialization._get_layout", "torch.Size", "torch.Tensor", "torch.device",
            "_codecs.encode", "builtins.bytearray", "builtins.set", "builtins.complex",
            "torch._tensor._rebuild_from_type_v2", "torch.storage.TypedStorage", "torch.storage.UntypedStorage",
            *(f"torch._utils.{f}" for f in (
                "_rebuild_parameter", "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_tensor",
                "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_sparse_tensor",
                "_rebuild_meta_tensor_no_storage", "_rebuild_nested_tensor", "_rebuild_wrapper_subclass",
                "_rebuild_device_tensor_from_numpy", "_rebuild_device_tensor_from_cpu_tensor")),
            *(f"torch.{t}" for t in (
                "float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool",
                "complex32", "complex64", "complex128", "FloatStorage", "DoubleStorage", "HalfStorage",
                "BFloat16Storage", "LongStorage", "IntStorage", "ShortStorage", "CharStorage", "ByteStorage",
                "BoolStorage", "ComplexFloatStorage", "ComplexDoubleStorage")),
        ]  # fmt: skip
    pairs = (name.rsplit(".", 1) for name in names if "." in name)
    return frozenset((module, attr) for module, attr in pairs)


_SAFE_GLOBALS = _weights_only_allowed()
# Instances of these may be the target of BUILD and (the dict types) of SETITEM(S), as weights_only allows.
_BUILDABLE_MAKERS = {
    pair for pair in _SAFE_GLOBALS if pair[0] in ("torch._utils", "torch._tensor") or pair[1] in ("Tensor",)
} | {("collections", "OrderedDict"), ("collections", "Counter"), ("torch.nn.parameter", "Parameter")}
_DICT_MAKERS = {("collections", "OrderedDict"), ("collections", "Counter")}

_DANGEROUS_MODULES = {
    "os", "posix", "nt", "subprocess", "sys", "socket", "shutil", "runpy", "importlib", "pty",
    "webbrowser", "ctypes", "multiprocessing", "code", "codeop", "pickle", "_pickle", "cPickle", "marshal",
    "commands", "popen2", "platform", "pdb", "bdb", "timeit", "trace", "profile", "cProfile", "asyncio",
    "io", "_io", "tempfile", "pathlib", "types", "operator", "functools", "copyreg", "copy_reg", "zipimport",
    "pydoc", "inspect", "_posixsubprocess", "signal", "threading", "_thread",
}  # fmt: skip
_DANGEROUS_BUILTINS = {"eval", "exec", "compile", "open", "__import__", "getattr", "setattr", "delattr",
                       "globals", "locals", "vars", "input", "breakpoint", "__loader__", "__builtins__",
                       "type", "object", "memoryview", "help", "exit", "quit"}  # fmt: skip
_DANGEROUS_NAMES = {
    ("torch._utils", "_import_dotted_name"), ("torch", "load"), ("torch.serialization", "load"),
    ("torch.serialization", "_load"), ("torch.serialization", "_legacy_load"), ("torch.jit", "load"),
    ("torch._C", "import_ir_module"), ("torch.hub", "load"), ("torch.package", "PackageImporter"),
    ("numpy", "load"), ("numpy.lib.npyio", "load"), ("torch._utils", "_rebuild_from_type"),
}  # fmt: skip


@dataclass(frozen=True)
class ScanFinding:
    """One thing in a pickle that torch's ``weights_only`` unpickler would not accept.

    For an import, ``module`` and ``name`` are the global; for anything else
    ``module`` is ``"<pickle>"``, ``"<zip>"`` or ``"<torch>"``, ``name`` names
    the opcode or construct and ``reason`` says what it does.
    """

    module: str
    name: str
    dangerous: bool
    where: str
    reason: str = ""

    @property
    def imports(self) -> bool:
        """Whether this finding is a global the file imports (rather than an opcode or a structure)."""
        return not self.module.startswith("<")

    def describe(self) -> str:
        """What was found, in words."""
        return self.reason or f"imports {self.module}.{self.name}"

    def __str__(self) -> str:
        return f"{'DANGEROUS ' if self.dangerous else ''}{self.describe()} (in {self.where})"


@dataclass
class ScanResult:
    """What a scan of one file found. ``ok`` when nothing off the safe list and no error was found.

    ``kind`` is what the file turned out to be: ``"torch-zip"``, ``"torch-legacy"``,
    ``"torch-tar"`` or ``"pickle"`` (any other pickle, or bytes that are none).
    """

    path: str
    pickles: int = 0
    globals: set[tuple[str, str]] = field(default_factory=set)
    findings: list[ScanFinding] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    kind: str = "pickle"

    @property
    def ok(self) -> bool:
        return not self.findings and not self.errors


def _is_safe(module: str, name: str) -> bool:
    return (module, name) in _SAFE_GLOBALS


def _dangerous(module: str, name: str) -> bool:
    root = module.split(".")[0]
    return (
        root in _DANGEROUS_MODULES
        or (root in ("builtins", "__builtin__") and name in _DANGEROUS_BUILTINS)
        or (module, name) in _DANGEROUS_NAMES
        or "." in name  # protocol 4+ walks attributes: torch._utils._rebuild_tensor.__globals__, ...
        or name.startswith("__")
    )


# -- opening files ------------------------------------------------------------------------------


def open_regular_file(path: str, shown: str | None = None) -> int:
    """Open ``path`` read-only without blocking, and only if it is a regular file.

    A FIFO or a device (``/dev/zero``) in place of a checkpoint would block
    the reader or feed it bytes without end; the file is opened with
    ``O_NONBLOCK`` and checked with ``fstat`` on that same descriptor.

    Returns:
        The descriptor; the caller closes it.

    Raises:
        CheckpointNotFoundError: nothing is at ``path``.
        CorruptCheckpointError: something other than a regular file is there.
        StorageError: it could not be opened (permissions, I/O).
    """
    shown = path if shown is None else shown
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointNotFoundError(f"No file at {shown!r}.", path=shown) from None
    except OSError as exc:
        raise StorageError(
            f"Could not open {shown!r}: {exc.strerror or exc}. Check that it exists and is readable.", path=shown
        ) from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = (
                "a directory" if stat.S_ISDIR(mode)
                else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "a character device" if stat.S_ISCHR(mode)
                else "a block device" if stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file"
            )  # fmt: skip
            raise CorruptCheckpointError(
                f"{shown!r} is {kind}, not a regular file; a checkpoint is a file (or a checkpoint directory). "
                "Point torchkeep at the checkpoint file itself.",
                path=shown,
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Source:
    """Random access to the bytes scanned: a file descriptor (``pread``) or a bytes object."""

    def __init__(self, *, fd: int | None = None, data: bytes | None = None) -> None:
        self.fd = fd
        self.data = memoryview(data) if data is not None else None
        self.size = len(data) if data is not None else os.fstat(fd).st_size  # type: ignore[arg-type]

    def read_at(self, offset: int, n: int) -> bytes:
        if n <= 0 or offset < 0 or offset >= self.size:
            return b""
        if self.data is not None:
            return bytes(self.data[offset : offset + n])
        assert self.fd is not None
        parts = []
        while n > 0:
            chunk = os.pread(self.fd, min(n, 1 << 24), offset)
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def file(self) -> BinaryIO:
        """A seekable file object over the same bytes (for Python's and torch's zip readers)."""
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.fd is not None
        f = io.FileIO(self.fd, "rb", closefd=False)
        f.seek(0)
        return f


class _Truncated(Exception):
    pass


class _PickleError(Exception):
    pass


class _Stream:
    """Bytes ``[start, end)`` of a source, read forward through a small buffer."""

    def __init__(self, source: _Source, start: int, end: int) -> None:
        self.source, self.end = source, min(end, source.size)
        self.base, self.buf, self.i = start, b"", 0

    def tell(self) -> int:
        return self.base + self.i

    def remaining(self) -> int:
        return self.end - self.tell()

    def _fill(self, need: int) -> None:
        if len(self.buf) - self.i >= need:
            return
        self.buf = self.buf[self.i :]
        self.base += self.i
        self.i = 0
        at = self.base + len(self.buf)
        want = min(max(need - len(self.buf), _CHUNK), self.end - at)
        if want > 0:
            self.buf += self.source.read_at(at, want)

    def read(self, n: int) -> bytes:
        i = self.i
        if i + n <= len(self.buf):  # the common case: already buffered
            self.i = i + n
            return self.buf[i : i + n]
        self._fill(n)
        if len(self.buf) - self.i < n:
            raise _Truncated
        out = self.buf[self.i : self.i + n]
        self.i += n
        return out

    def skip(self, n: int) -> None:
        if n > self.remaining():
            raise _Truncated
        if n <= len(self.buf) - self.i:
            self.i += n
        else:
            self.base, self.buf, self.i = self.tell() + n, b"", 0

    def readline(self) -> bytes:
        while True:
            j = self.buf.find(b"\n", self.i)
            if j >= 0:
                if j - self.i > _MAX_LINE:
                    raise _PickleError(f"a text opcode's line is longer than {_MAX_LINE} bytes")
                line = self.buf[self.i : j]
                self.i = j + 1
                return line
            have = len(self.buf) - self.i
            if have > _MAX_LINE:
                raise _PickleError(f"a text opcode's line is longer than {_MAX_LINE} bytes")
            self._fill(have + _CHUNK)
            if len(self.buf) - self.i == have:
                raise _Truncated  # no newline before the end: the unpickler fails here too


# -- the emulated pickle machine ------------------------------------------------------------------


class _Kind:
    """A value whose content does not matter to the scan, only what it is."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __repr__(self) -> str:
        return self.what


_INT, _FLOAT, _NONE, _BOOL, _BYTES = _Kind("an int"), _Kind("a float"), _Kind("None"), _Kind("a bool"), _Kind("bytes")
_LONG_STR = _Kind("a long string")
_LIST, _DICT, _SET, _FROZENSET = _Kind("a list"), _Kind("a dict"), _Kind("a set"), _Kind("a frozenset")
_PERSISTENT = _Kind("a persistent object")
_BUFFER = _Kind("a buffer")


class _Global:
    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __repr__(self) -> str:
        return f"{self.module}.{self.name}"


_UNRESOLVED = _Global("<unresolved>", "<unresolved>")


class _Obj:
    """What calling a global made."""

    __slots__ = ("maker",)

    def __init__(self, maker: _Global) -> None:
        self.maker = maker

    def __repr__(self) -> str:
        return f"an object made by {self.maker!r}"


def _made_by(obj: _Obj, makers: set[tuple[str, str]]) -> bool:
    """Whether ``obj`` was made by one of ``makers``, or by a global already reported (no second finding)."""
    pair = (obj.maker.module, obj.maker.name)
    return pair in makers or (obj.maker is not _UNRESOLVED and pair not in _SAFE_GLOBALS)


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return "a string"
    if isinstance(value, tuple):
        return "a tuple"
    if isinstance(value, _Global):
        return f"the global {value!r} itself"
    return repr(value)


# Opcodes torch's weights_only unpickler accepts (torch/_weights_only_unpickler.py, Unpickler.load).
_WEIGHTS_ONLY_OPCODES = frozenset(b"c\x81Rbaesu(t\x85\x86\x87N\x89\x88)]}\x8fJKMGXUQhjqr\x8a\x80.")

_OPCODE_NAMES = {
    b"(": "MARK", b".": "STOP", b"0": "POP", b"1": "POP_MARK", b"2": "DUP", b"F": "FLOAT", b"I": "INT",
    b"J": "BININT", b"K": "BININT1", b"L": "LONG", b"M": "BININT2", b"N": "NONE", b"P": "PERSID",
    b"Q": "BINPERSID", b"R": "REDUCE", b"S": "STRING", b"T": "BINSTRING", b"U": "SHORT_BINSTRING",
    b"V": "UNICODE", b"X": "BINUNICODE", b"a": "APPEND", b"b": "BUILD", b"c": "GLOBAL", b"d": "DICT",
    b"}": "EMPTY_DICT", b"e": "APPENDS", b"g": "GET", b"h": "BINGET", b"i": "INST", b"j": "LONG_BINGET",
    b"l": "LIST", b"]": "EMPTY_LIST", b"o": "OBJ", b"p": "PUT", b"q": "BINPUT", b"r": "LONG_BINPUT",
    b"s": "SETITEM", b"t": "TUPLE", b")": "EMPTY_TUPLE", b"u": "SETITEMS", b"G": "BINFLOAT",
    b"\x80": "PROTO", b"\x81": "NEWOBJ", b"\x82": "EXT1", b"\x83": "EXT2", b"\x84": "EXT4", b"\x85": "TUPLE1",
    b"\x86": "TUPLE2", b"\x87": "TUPLE3", b"\x88": "NEWTRUE", b"\x89": "NEWFALSE", b"\x8a": "LONG1",
    b"\x8b": "LONG4", b"B": "BINBYTES", b"C": "SHORT_BINBYTES", b"\x8c": "SHORT_BINUNICODE",
    b"\x8d": "BINUNICODE8", b"\x8e": "BINBYTES8", b"\x8f": "EMPTY_SET", b"\x90": "ADDITEMS",
    b"\x91": "FROZENSET", b"\x92": "NEWOBJ_EX", b"\x93": "STACK_GLOBAL", b"\x94": "MEMOIZE", b"\x95": "FRAME",
    b"\x96": "BYTEARRAY8", b"\x97": "NEXT_BUFFER", b"\x98": "READONLY_BUFFER",
}  # fmt: skip
_OPCODES = {code[0]: name for code, name in _OPCODE_NAMES.items()}


class _Scan:
    """The state of one file's scan: what was found, and the budget of strings kept."""

    def __init__(self, result: ScanResult) -> None:
        self.result = result
        self.kept = 0
        self._seen: set[tuple[str, str, str, str]] = set()

    def finding(self, module: str, name: str, where: str, *, dangerous: bool, reason: str = "") -> None:
        key = (module, name, where, reason)
        if key in self._seen or len(self._seen) >= _MAX_FINDINGS:
            return  # past that many, the file is refused anyway
        self._seen.add(key)
        self.result.findings.append(ScanFinding(module, name, dangerous, where, reason))

    def imported(self, module: str, name: str, where: str) -> None:
        self.result.globals.add((module, name))
        if not _is_safe(module, name):
            self.finding(module, name, where, dangerous=_dangerous(module, name))

    def refuse(self, opcode: str, where: str, reason: str, *, dangerous: bool = False) -> None:
        self.finding("<pickle>", opcode, where, dangerous=dangerous, reason=reason)


class _Machine:
    """One pickle, run as CPython's ``_pickle.Unpickler`` would, but on symbols instead of objects.

    Only what decides which globals get imported and called is kept exact:
    strings (up to a length), the memo, the stack and its marks. Everything
    else is a kind (an int, a list, an object made by some global).
    """

    def __init__(self, scan: _Scan, where: str) -> None:
        self.scan, self.where = scan, where
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self.proto = 0

    # stack primitives, with _pickle's fence: nothing below the last MARK may be popped
    def _fence(self) -> int:
        return self.marks[-1] if self.marks else 0

    def push(self, value: Any) -> None:
        if len(self.stack) >= _MAX_ITEMS:
            raise _PickleError(f"its stack grows past {_MAX_ITEMS} items; torchkeep does not scan pickles that big")
        self.stack.append(value)

    def pop(self) -> Any:
        if len(self.stack) <= self._fence():
            raise _PickleError("it pops an empty stack")
        return self.stack.pop()

    def top(self) -> Any:
        if len(self.stack) <= self._fence():
            raise _PickleError("it reads an empty stack")
        return self.stack[-1]

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise _PickleError("it uses a MARK that was never set")
        at = self.marks.pop()
        items = self.stack[at:]
        del self.stack[at:]
        return items

    def memo_put(self, index: int, value: Any) -> None:
        if len(self.memo) >= _MAX_ITEMS and index not in self.memo:
            raise _PickleError(f"its memo grows past {_MAX_ITEMS} entries; torchkeep does not scan pickles that big")
        self.memo[index] = value

    def memo_get(self, index: int) -> None:
        if index not in self.memo:
            raise _PickleError(f"it reads memo entry {index}, which was never stored")
        self.push(self.memo[index])

    def text(self, raw: bytes, decode: Callable[[bytes], str]) -> Any:
        """A string the pickle builds: kept (within the budget) so that globals can be named."""
        if len(raw) > _MAX_KEPT_STRING or self.scan.kept + len(raw) > _MAX_KEPT_TOTAL:
            return _LONG_STR
        try:
            value = decode(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _PickleError(f"a string does not decode ({exc})") from None
        self.scan.kept += len(value)
        return value

    def long_text(self, stream: _Stream, n: int, decode: Callable[[bytes], str]) -> Any:
        if n > _MAX_KEPT_STRING:
            stream.skip(n)
            return _LONG_STR
        return self.text(stream.read(n), decode)

    # what the unpickler does with globals
    def find_class(self, module: str, name: str) -> _Global:
        if self.proto < 3:  # _pickle maps Python 2 names (fix_imports, on in torch.load)
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        self.scan.imported(module, name, self.where)
        return _Global(module, name)

    def call(self, opcode: str, callee: Any) -> _Obj:
        """REDUCE, NEWOBJ, NEWOBJ_EX, OBJ and INST call ``callee``: it must be a named global."""
        if isinstance(callee, _Global):
            return _Obj(callee)
        self.scan.refuse(
            opcode,
            self.where,
            f"{opcode} calls {_describe(callee)}, not a named global, so what it runs cannot be known statically",
            dangerous=True,
        )
        return _Obj(_UNRESOLVED)

    def check(self, ok: bool, opcode: str, what: str) -> None:
        if not ok:
            self.scan.refuse(opcode, self.where, f"{what}, which torch's weights_only unpickler refuses")

    def run(self, stream: _Stream) -> None:
        """Run one pickle up to its STOP; raises _PickleError or _Truncated where the unpickler would fail."""
        read, push, pop, top = stream.read, self.push, self.pop, self.top
        while True:
            code = read(1)[0]
            name = _OPCODES.get(code)
            if name is None:
                raise _PickleError(f"invalid opcode {bytes([code])!r} at byte {stream.tell() - 1}")
            if code not in _WEIGHTS_ONLY_OPCODES:
                self.scan.refuse(name, self.where, f"uses the {name} opcode, which torch's weights_only unpickler "
                                                   "refuses")  # fmt: skip
            if name == "STOP":
                pop()
                return
            if name in ("BINPUT", "LONG_BINPUT"):
                index = read(1)[0] if name == "BINPUT" else struct.unpack("<I", read(4))[0]
                self.memo_put(index, top())
            elif name in ("BINGET", "LONG_BINGET"):
                self.memo_get(read(1)[0] if name == "BINGET" else struct.unpack("<I", read(4))[0])
            elif name in ("BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"):
                size = {"BINUNICODE": "<I", "SHORT_BINUNICODE": "<B", "BINUNICODE8": "<Q"}[name]
                n = struct.unpack(size, read(struct.calcsize(size)))[0]
                push(self.long_text(stream, n, lambda raw: raw.decode("utf-8", "surrogatepass")))
            elif name == "MARK":
                if len(self.marks) >= _MAX_ITEMS:
                    raise _PickleError("too many MARKs")
                self.marks.append(len(self.stack))
            elif name == "TUPLE":
                push(tuple(self.pop_mark()))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items = [pop() for _ in range(n)][::-1]
                push(tuple(items))
            elif name == "BININT1":
                read(1)
                push(_INT)
            elif name == "REDUCE":
                pop()
                self.stack[-1] = self.call(name, top())
            elif name == "EMPTY_TUPLE":
                push(())
            elif name in ("NEWTRUE", "NEWFALSE"):
                push(_BOOL)
            elif name == "BINPERSID":
                pid = pop()
                self.check(
                    isinstance(pid, tuple) and len(pid) > 0 and pid[0] == "storage",
                    name,
                    f"BINPERSID loads the persistent id {_describe(pid)} (only ('storage', ...) is torch's)",
                )
                push(_PERSISTENT)
            elif name == "BININT":
                read(4)
                push(_INT)
            elif name == "BININT2":
                read(2)
                push(_INT)
            elif name == "SETITEMS":
                if len(self.pop_mark()) % 2:
                    raise _PickleError("odd number of items for SETITEMS")
                self._check_dict(name)
            elif name == "EMPTY_DICT":
                push(_DICT)
            elif name in ("GLOBAL", "INST"):
                module, attr = self._line_utf8(stream), self._line_utf8(stream)
                cls = self.find_class(module, attr)
                if name == "INST":
                    self.pop_mark()
                    push(self.call(name, cls))
                else:
                    push(cls)
            elif name == "NONE":
                push(_NONE)
            elif name == "POP":
                if self.marks and self.marks[-1] == len(self.stack):
                    self.marks.pop()  # _pickle pops a MARK sitting on top of the stack
                else:
                    pop()
            elif name == "POP_MARK":
                self.pop_mark()
            elif name == "DUP":
                push(top())
            elif name in ("FLOAT",):
                stream.readline()
                push(_FLOAT)
            elif name in ("INT", "LONG"):
                stream.readline()
                push(_INT)
            elif name == "BINFLOAT":
                read(8)
                push(_FLOAT)
            elif name == "LONG1":
                stream.skip(read(1)[0])
                push(_INT)
            elif name == "LONG4":
                n = struct.unpack("<i", read(4))[0]
                if n < 0:
                    raise _PickleError("LONG4 has a negative byte count")
                stream.skip(n)
                push(_INT)
            elif name == "STRING":
                line = stream.readline()
                if len(line) < 2 or line[:1] not in (b"'", b'"') or line[-1:] != line[:1]:
                    raise _PickleError("the STRING opcode argument must be quoted")
                push(self.text(line[1:-1], lambda raw: codecs.escape_decode(raw)[0].decode("utf-8")))
            elif name == "BINSTRING":
                n = struct.unpack("<i", read(4))[0]
                if n < 0:
                    raise _PickleError("BINSTRING has a negative length")
                push(self.long_text(stream, n, lambda raw: raw.decode("utf-8")))
            elif name == "SHORT_BINSTRING":
                push(self.long_text(stream, read(1)[0], lambda raw: raw.decode("utf-8")))
            elif name == "UNICODE":
                push(self.text(stream.readline(), lambda raw: raw.decode("raw-unicode-escape")))
            elif name in ("BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"):
                size = {"BINBYTES": "<I", "SHORT_BINBYTES": "<B", "BINBYTES8": "<Q", "BYTEARRAY8": "<Q"}[name]
                stream.skip(struct.unpack(size, read(struct.calcsize(size)))[0])
                push(_BYTES)
            elif name == "EMPTY_LIST":
                push(_LIST)
            elif name == "LIST":
                self.pop_mark()
                push(_LIST)
            elif name == "DICT":
                if len(self.pop_mark()) % 2:
                    raise _PickleError("odd number of items for DICT")
                push(_DICT)
            elif name == "EMPTY_SET":
                push(_SET)
            elif name == "FROZENSET":
                self.pop_mark()
                push(_FROZENSET)
            elif name == "APPEND":
                pop()
                self.check(top() is _LIST, name, f"APPEND adds to {_describe(top())}")
            elif name == "APPENDS":
                self.pop_mark()
                self.check(top() is _LIST, name, f"APPENDS extends {_describe(top())}")
            elif name == "SETITEM":
                pop()
                pop()
                self._check_dict(name)
            elif name == "ADDITEMS":
                self.pop_mark()
                top()
            elif name == "GET":
                self.memo_get(self._decimal(stream.readline()))
            elif name == "PUT":
                index = self._decimal(stream.readline())
                if index < 0:
                    raise _PickleError("negative PUT argument")
                self.memo_put(index, top())
            elif name == "MEMOIZE":
                self.memo_put(len(self.memo), top())
            elif name == "FRAME":
                if struct.unpack("<Q", read(8))[0] > stream.remaining():
                    raise _Truncated
            elif name == "PROTO":
                proto = read(1)[0]
                if proto > 5:
                    raise _PickleError(f"unsupported pickle protocol {proto}")
                self.proto = proto
            elif name == "STACK_GLOBAL":
                attr, module = pop(), pop()
                if isinstance(module, str) and isinstance(attr, str):
                    push(self.find_class(module, attr))
                else:
                    self.scan.refuse(
                        name,
                        self.where,
                        f"STACK_GLOBAL imports a global whose module and name are not known statically "
                        f"({_describe(module)} and {_describe(attr)})",
                        dangerous=True,
                    )
                    push(_UNRESOLVED)
            elif name in ("EXT1", "EXT2", "EXT4"):
                size = {"EXT1": "<B", "EXT2": "<H", "EXT4": "<i"}[name]
                ext = struct.unpack(size, read(struct.calcsize(size)))[0]
                if ext <= 0:
                    raise _PickleError("EXT specifies code <= 0")
                self.scan.refuse(
                    name,
                    self.where,
                    f"{name} imports the global registered as extension code {ext} in copyreg, "
                    "which depends on the process loading it",
                    dangerous=True,
                )
                push(_UNRESOLVED)
            elif name == "NEWOBJ":
                pop()
                push(self.call(name, pop()))
            elif name == "NEWOBJ_EX":
                pop()
                pop()
                push(self.call(name, pop()))
            elif name == "OBJ":
                items = self.pop_mark()
                if not items:
                    raise _PickleError("OBJ without a class")
                push(self.call(name, items[0]))
            elif name == "BUILD":
                pop()
                self._check_build(top())
            elif name == "PERSID":
                stream.readline()
                push(_PERSISTENT)
            elif name == "NEXT_BUFFER":
                raise _PickleError("it refers to out-of-band buffers, which torch.load never passes")
            elif name == "READONLY_BUFFER":
                top()
                self.stack[-1] = _BUFFER
            else:  # pragma: no cover - every name in _OPCODES is handled above
                raise _PickleError(f"unhandled opcode {name}")

    def _check_dict(self, opcode: str) -> None:
        target = self.top()
        ok = target is _DICT or (isinstance(target, _Obj) and _made_by(target, _DICT_MAKERS))
        self.check(ok, opcode, f"{opcode} sets items of {_describe(target)}")

    def _check_build(self, target: Any) -> None:
        if isinstance(target, _Global):
            self.scan.refuse(
                "BUILD",
                self.where,
                f"BUILD sets attributes of the global {target!r} itself, changing it for the whole process",
                dangerous=True,
            )
            return
        ok = isinstance(target, _Obj) and _made_by(target, _BUILDABLE_MAKERS)
        self.check(ok, "BUILD", f"BUILD sets the state of {_describe(target)}")

    @staticmethod
    def _decimal(line: bytes) -> int:
        try:
            return int(line.strip(), 10)
        except ValueError:
            raise _PickleError(f"a memo index {line[:20]!r} is not a number") from None

    @staticmethod
    def _line_utf8(stream: _Stream) -> str:
        try:
            return stream.readline().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _PickleError(f"a global's name does not decode as UTF-8 ({exc})") from None


def _run_pickle(scan: _Scan, stream: _Stream, where: str) -> str | None:
    """Run one pickle from the stream's position; returns why it could not be read, or None."""
    machine = _Machine(scan, where)
    start = stream.tell()
    try:
        machine.run(stream)
    except _Truncated:
        return f"{where}: the pickle starting at byte {start} ends before its STOP opcode (truncated)"
    except _PickleError as exc:
        return f"{where}: the pickle starting at byte {start} is not readable: {exc}"
    except (struct.error, IndexError) as exc:  # a malformed argument
        return f"{where}: the pickle starting at byte {start} is not readable: {exc}"
    scan.result.pickles += 1
    return None


# -- files: zips, legacy files, other pickles ----------------------------------------------------


_METHODS = {8: "deflate", 9: "deflate64", 12: "bzip2", 14: "lzma", 93: "zstandard"}


def zip_record_problem(info: zipfile.ZipInfo) -> str | None:
    """Why ``torch.save`` could not have written this zip record (encrypted, compressed), or None.

    torch stores every record uncompressed and unencrypted; torchkeep reads
    no other, so a small file can never inflate to gigabytes in memory.
    """
    if info.flag_bits & 0x1:
        return (
            f"record {info.filename!r} is encrypted; torch.save never encrypts records and torch cannot read "
            "them. The file is damaged or was not written by torch.save; re-save it with torch.save."
        )
    if info.compress_type != zipfile.ZIP_STORED:
        method = _METHODS.get(info.compress_type)
        what = f"{method} compression" if method else f"an unknown compression method ({info.compress_type})"
        return (
            f"record {info.filename!r} uses {what}; torch.save stores every record uncompressed, so torchkeep "
            "refuses to inflate it (a small compressed record can inflate to gigabytes). Re-save the file with "
            "torch.save."
        )
    if info.file_size != info.compress_size:
        return f"record {info.filename!r} is stored with two different sizes; the zip directory is damaged."
    return None


class _FileScan:
    def __init__(self, source: _Source, path: str) -> None:
        self.source, self.path = source, path
        self.result = ScanResult(path=path)
        self.scan = _Scan(self.result)

    def error(self, message: str) -> None:
        self.result.errors.append(message)

    def run(self) -> ScanResult:
        try:
            self.dispatch()
        except OSError as exc:  # the disk failed under the scan
            self.error(f"{self.path}: reading it failed ({exc.strerror or exc})")
        return self.result

    def dispatch(self) -> None:
        head = self.source.read_at(0, 4)
        if head == b"PK\x03\x04":  # what torch.load checks (torch.serialization._is_zipfile)
            self.result.kind = "torch-zip"
            self.zip()
        elif self.is_tar():
            self.result.kind = "torch-tar"
            self.scan.finding(
                "<torch>",
                "tar",
                self.path,
                dangerous=False,
                reason="is torch's old tar format, whose pickles torch.load unpickles without any restriction "
                "(weights_only refuses the format); it cannot be scanned",
            )
        else:
            legacy = self.source.read_at(0, len(_TORCH_LEGACY_MAGIC)) == _TORCH_LEGACY_MAGIC
            self.result.kind = "torch-legacy" if legacy else "pickle"
            self.pickles(legacy=legacy)

    def is_tar(self) -> bool:
        """Whether torch.load would take the file for its old tar format (it tries that before anything else)."""
        try:
            with tarfile.open(fileobj=self.source.file(), mode="r:", format=tarfile.PAX_FORMAT):
                return True
        except Exception:
            return False

    def pickles(self, *, legacy: bool) -> None:
        """A legacy file: its five pickles, then raw storage bytes. Anything else: its pickles one by one."""
        stream = _Stream(self.source, 0, self.source.size)
        count = 0
        while stream.remaining() > 0 and (not legacy or count < _LEGACY_PICKLES):
            problem = _run_pickle(self.scan, stream, self.path)
            if problem is not None:
                if count == 0 or legacy:
                    self.error(problem)
                return  # after a plain pickle, what follows is not a pickle
            count += 1
        if legacy and count < _LEGACY_PICKLES:
            self.error(f"{self.path}: a torch legacy file holds {_LEGACY_PICKLES} pickles; this one ends after {count}")
        if count == 0 and not self.result.errors:
            self.error(f"{self.path}: the file is empty")

    def zip(self) -> None:
        try:
            archive = zipfile.ZipFile(self.source.file())
            infos = archive.infolist()
        except Exception as exc:  # zipfile raises many kinds on damaged bytes
            self.error(f"{self.path}: not a readable zip archive ({type(exc).__name__}: {exc})")
            return
        if not infos:
            self.error(f"{self.path}: the zip archive holds no records, so torch cannot load it")
            return
        problems = [p for p in (zip_record_problem(info) for info in infos) if p]
        for problem in problems:
            self.error(f"{self.path}: {problem}")
        if problems:
            return
        records = self.zip_records(archive, infos)
        if records is None:
            return
        pickle_records = [(name, offset, size) for name, offset, size in records if name.lower().endswith(".pkl")]
        if not any(name.lower() == "data.pkl" for name, _, _ in pickle_records):
            self.error(
                f"{self.path}: the zip holds no data.pkl record, the pickle torch loads; it is damaged or not a "
                "torch checkpoint"
            )
        if any(name.lower() == "constants.pkl" for name, _, _ in pickle_records):
            self.scan.finding(
                "<torch>",
                "TorchScript",
                self.path,
                dangerous=True,
                reason="is a TorchScript archive, which torch.load hands to torch.jit.load (code, not weights)",
            )
        for name, offset, size in pickle_records:
            stream = _Stream(self.source, offset, offset + size)
            failure = _run_pickle(self.scan, stream, f"{self.path}:{name}")
            if failure is not None:
                self.error(failure)
        data_pkl = [size for name, _, size in pickle_records if name.lower() == "data.pkl"]
        if data_pkl and data_pkl[0] <= _SECOND_OPINION_LIMIT and not self.result.errors:
            self.second_opinion()

    def zip_records(self, archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo]) -> list[tuple[str, int, int]] | None:
        """Every record as torch's zip reader sees it: (name inside the archive folder, data offset, size).

        Python's zip reader and torch's (miniz) must agree record by record on
        the name, where the data starts and its size; a zip that shows each of
        them something different is refused.
        """
        names = [_utf8_name(info) for info in infos]  # how torch's reader names them
        lowered = [name.lower() for name in names]
        if len(set(lowered)) != len(lowered):
            dup = sorted({n for n in lowered if lowered.count(n) > 1})
            self.error(
                f"{self.path}: the zip holds several records named {dup[0]!r} (ignoring case); torch would read "
                "only one of them"
            )
            return None
        ours = []
        for info, full_name in zip(infos, names, strict=True):
            header = self.source.read_at(info.header_offset, 30)
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                self.error(f"{self.path}: record {info.filename!r} has no local header where the directory says")
                return None
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            offset = info.header_offset + 30 + name_len + extra_len
            if offset + info.file_size > self.source.size:
                self.error(f"{self.path}: record {info.filename!r} runs past the end of the file (truncated)")
                return None
            ours.append((full_name, offset, info.file_size))
        shift = _zip_directory_shift(archive)
        if shift:
            self.error(
                f"{self.path}: the zip directory is {shift} bytes away from where its end record says; torch "
                "and Python would read different records"
            )
            return None
        try:
            import torch

            reader: Any = torch._C.PyTorchFileReader(self.source.file())
            theirs = [
                (str(n), int(reader.get_record_offset(n)), int(reader.get_record_size(n)))
                for n in reader.get_all_records()
            ]
        except Exception as exc:  # torch's reader raises RuntimeError on anything it cannot read
            self.error(f"{self.path}: torch cannot read this zip ({type(exc).__name__}: {str(exc).strip()[:200]})")
            return None
        prefix = names[0].split("/", 1)[0] + "/"
        agree = len(ours) == len(theirs) and all(
            full == prefix + name and offset == their_offset and size == their_size
            for (full, offset, size), (name, their_offset, their_size) in zip(ours, theirs, strict=True)
        )
        if not agree:
            self.error(
                f"{self.path}: torch's zip reader and Python's see different records in this file; it was crafted "
                "or damaged"
            )
            return None
        return theirs

    def second_opinion(self) -> None:
        """torch's own static check of data.pkl: anything it names is reported too."""
        try:
            import torch

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                flagged = torch.serialization.get_unsafe_globals_in_checkpoint(self.source.file())
        except Exception:  # it fails on opcodes it does not know (which the scan above reports)
            return
        ours = {f"{f.module}.{f.name}" for f in self.result.findings if f.imports}
        for full in sorted(flagged):
            if full not in ours:
                module, _, name = full.rpartition(".")
                self.scan.finding(
                    module, name, f"{self.path}:data.pkl", dangerous=_dangerous(module, name),
                    reason=f"imports {full} (flagged by torch.serialization.get_unsafe_globals_in_checkpoint)",
                )  # fmt: skip


def _utf8_name(info: zipfile.ZipInfo) -> str:
    """A record's name as torch's reader gives it: its raw bytes read as UTF-8 (Python uses cp437 unless flagged)."""
    raw = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
    return raw.decode("utf-8", "replace")


# zipfile's indices into its end record, and the sizes of the zip64 end record and locator (APPNOTE 4.3.14-15).
_ECD_SIGNATURE, _ECD_SIZE, _ECD_OFFSET, _ECD_LOCATION = 0, 5, 6, 9
_ZIP64_END_SIZE, _ZIP64_LOCATOR_SIZE = 56, 20


def _zip_directory_shift(archive: zipfile.ZipFile) -> int:
    """How far Python moved the zip directory from where the end record puts it (0 for a torch file).

    Python's zip reader tolerates data prepended to an archive by shifting
    every offset, and reads a zip64 end record just before its locator;
    torch's reader does neither. A non-zero shift means the two readers would
    see different directories, and torch's must not even be opened on it (it
    inflates records as it opens).
    """
    end_record = getattr(zipfile, "_EndRecData", None)
    fp = getattr(archive, "fp", None)
    if end_record is None or fp is None:
        return 0
    try:
        rec = end_record(fp)  # Python's own reading of the end record(s); fields as zipfile numbers them
        location = int(rec[_ECD_LOCATION])
        concat = location - int(rec[_ECD_SIZE]) - int(rec[_ECD_OFFSET])
        if rec[_ECD_SIGNATURE] == b"PK\x06\x06":  # a zip64 end record
            concat -= _ZIP64_END_SIZE + _ZIP64_LOCATOR_SIZE
            # Python reads the zip64 end record just before its locator; torch where the locator points.
            fp.seek(location - _ZIP64_LOCATOR_SIZE)
            pointed = struct.unpack("<4sLQL", fp.read(_ZIP64_LOCATOR_SIZE))[2]
            expected = location - _ZIP64_LOCATOR_SIZE - _ZIP64_END_SIZE
            if pointed != expected:
                return pointed - expected
    except Exception:
        return 0
    return concat


# -- entry points -------------------------------------------------------------------------------


def scan_bytes(data: bytes, path: str = "<bytes>") -> ScanResult:
    """Scan a pickle-based file's bytes (a torch zip, a legacy torch file, or a plain pickle)."""
    return _FileScan(_Source(data=bytes(data)), path).run()


def scan_descriptor(fd: int, path: str) -> ScanResult:
    """Scan the regular file open at ``fd`` (see :func:`open_regular_file`); ``path`` names it in the result."""
    return _FileScan(_Source(fd=fd), path).run()


def scan_file(path: str) -> ScanResult:
    """Scan a file on disk; see :func:`scan_bytes`. Only the pickles are read, streamed.

    Raises:
        CheckpointNotFoundError: nothing is at ``path``.
        CorruptCheckpointError: ``path`` is not a regular file (a FIFO, a device, a directory).
    """
    fd = open_regular_file(path)
    try:
        return scan_descriptor(fd, path)
    finally:
        os.close(fd)
