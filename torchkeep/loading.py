"""``torchkeep.load``, ``inspect`` and ``verify``: every format torchkeep reads, without pickle."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Union

import torch

from torchkeep.errors import CorruptCheckpointError, InvalidArgumentError
from torchkeep.formats import read_consistently
from torchkeep.formats.source import Source, TorchFileSource
from torchkeep.info import CheckpointInfo, VerifyReport
from torchkeep.progress import Progress
from torchkeep.storage import Storage, resolve

__all__ = ["MapLocation", "inspect", "load", "read_source", "verify"]

MapLocation = Union[  # noqa: UP007 - kept readable for Python 3.10 users
    None, str, torch.device, dict[str, str], Callable[[torch.Tensor, str], torch.Tensor]
]


def _place(value: Any, saved: str, map_location: MapLocation, name: str, path: str) -> Any:
    if map_location is None or not isinstance(value, torch.Tensor):
        return value
    if callable(map_location) and not isinstance(map_location, (str, torch.device, dict)):
        moved = map_location(value, saved)
        if not isinstance(moved, torch.Tensor):
            raise InvalidArgumentError(
                f"map_location returned a {type(moved).__name__} for {name!r}; it must return a tensor."
            )
        return moved
    target = map_location.get(saved, saved) if isinstance(map_location, dict) else map_location
    try:
        device = torch.device(target)
        return value if value.device == device else value.to(device)
    except (RuntimeError, AssertionError, TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"Cannot place {name!r} (saved on {saved}) of {path!r} on {target!r}: {exc}. "
            'Pass map_location="cpu" or a device this machine has.',
            path=path,
            key=name,
        ) from exc


def _check_devices(map_location: MapLocation, path: str) -> None:
    """Refuse a target device this machine lacks before torch reports it as a damaged file."""
    if map_location is None or (callable(map_location) and not isinstance(map_location, (str, torch.device, dict))):
        return
    targets = list(map_location.values()) if isinstance(map_location, dict) else [map_location]
    for target in targets:
        try:
            device = torch.device(target)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("this machine has no CUDA device")
            if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
                raise RuntimeError(f"this machine has {torch.cuda.device_count()} CUDA device(s)")
        except (RuntimeError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(
                f'Cannot load {path!r} onto {target!r}: {exc}. Pass map_location="cpu" or a device this machine has.',
                path=path,
            ) from exc


def _cast(value: Any, dtype: torch.dtype | None) -> Any:
    if dtype is not None and isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    return value


def _cast_tree(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return _cast(obj, dtype)
    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = _cast_tree(v, dtype)
        return obj
    if isinstance(obj, list):
        return [_cast_tree(v, dtype) for v in obj]
    if type(obj) is tuple:
        return tuple(_cast_tree(v, dtype) for v in obj)
    return obj


def load(
    path: str | os.PathLike[str],
    *,
    map_location: MapLocation = None,
    dtype: torch.dtype | None = None,
    verify: bool = True,
    trust: bool = False,
    mmap: bool = True,
    storage: Storage | None = None,
) -> Any:
    """Load a checkpoint of any supported format and return its state tree.

    By default native checkpoints and safetensors files are memory-mapped:
    tensors view the file's pages (copy-on-write), so loading costs no second
    copy in private memory. The values are verified as they are mapped, and
    stay those values as long as nobody rewrites the file in place: torchkeep
    never does (a new save of the same path is a new file renamed into place,
    which leaves mapped pages alone), but another program truncating or
    overwriting the file changes them, or ends the process with SIGBUS when a
    truncated page is touched. ``mmap=False`` reads every tensor into private
    memory instead, verified there, immune to what happens to the file later.
    ``.pth`` files go through torch's restricted ``weights_only`` unpickler
    only, never plain pickle.

    Args:
        path: a native checkpoint directory, a ``.safetensors`` file, a sharded
            safetensors index (or its directory), or a ``.pth``/``.pt`` file.
        map_location: where tensors go. None (default) leaves them on the CPU,
            whatever device they were saved from. A string or ``torch.device``
            moves every tensor there; a dict maps saved devices
            (``{"cuda:0": "cpu"}``) and leaves others where they were saved; a
            callable ``f(tensor, saved_device) -> tensor`` decides per tensor.
        dtype: cast floating-point tensors to this dtype; others are untouched.
        verify: check every tensor's checksum (default). ``False`` skips it.
        mmap: map the files (default) or, with False, copy every tensor into private memory.
        trust: for a ``.pth`` holding pickled Python objects (a whole model saved
            with ``torch.save(model)``), unpickle it fully, with a warning: only for
            files you wrote yourself, since this runs any code they contain.
        storage: read from this storage, with ``path`` as the key.

    Raises:
        CheckpointNotFoundError: nothing committed at ``path``.
        ChecksumMismatchError: tensor bytes are damaged; all bad tensors are named.
        CorruptCheckpointError: the file or manifest is damaged or truncated.
        UnsafeCheckpointError: a ``.pth`` holds pickled objects that would run code.
        UnsupportedFormatError: an unknown format or a newer format version.
    """
    st, key = resolve(path, storage)
    return read_consistently(
        st,
        key,
        lambda source: read_source(
            source, map_location=map_location, dtype=dtype, verify=verify, trust=trust, mmap=mmap
        ),
    )


def read_source(
    source: Source,
    *,
    map_location: MapLocation = None,
    dtype: torch.dtype | None = None,
    verify: bool = True,
    trust: bool = False,
    key: Any = None,
    mmap: bool = True,
) -> Any:
    """The tree of an opened checkpoint (or its subtree under top-level ``key``), placed and cast as asked.

    With ``mmap=False`` every tensor is a private copy (see :func:`load`).
    """
    if isinstance(source, TorchFileSource):
        _check_devices(map_location, source.path)
        ml: Any = "cpu" if map_location is None else map_location
        obj = source.read(map_location=ml, trust=trust, verify=verify, mmap=mmap)
        if key is not None:
            if not isinstance(obj, dict) or key not in obj:
                raise CorruptCheckpointError(f"{source.path!r} holds no {key!r}.", path=source.path, key=str(key))
            obj = obj[key]
        return _cast_tree(obj, dtype) if dtype is not None else obj

    def place(name: str, value: Any, saved: str) -> Any:
        return _cast(_place(value, saved, map_location, name, source.path), dtype)

    plain = map_location is None and dtype is None
    return source.read_tree(verify=verify, key=key, place=None if plain else place, copy=not mmap)


def inspect(path: str | os.PathLike[str], *, trust: bool = False, storage: Storage | None = None) -> CheckpointInfo:
    """Describe a checkpoint (dtypes, shapes, sizes, metadata, tree) without reading tensor data.

    For torch zip files the tensors are memory-mapped and not touched; a legacy
    (non-zip) torch file has to be read whole. ``trust`` is as for :func:`load`.
    """
    st, key = resolve(path, storage)
    return read_consistently(st, key, lambda source: source.info(trust=trust))


def verify(
    path: str | os.PathLike[str],
    *,
    trust: bool = False,
    progress: Progress | None = None,
    storage: Storage | None = None,
) -> VerifyReport:
    """Re-read every byte of a checkpoint and check it against its checksums.

    Returns a report when everything is intact. Files without checksums
    (foreign safetensors, legacy torch files) are parsed completely instead,
    and the report's ``method`` says ``"structure"``. ``trust`` is as for :func:`load`;
    ``progress(done_bytes, total_bytes)`` is called as the bytes are checked.

    Raises:
        ChecksumMismatchError: names every damaged tensor (or zip record).
        CorruptCheckpointError: the structure is damaged.
    """
    st, key = resolve(path, storage)
    return read_consistently(st, key, lambda source: source.check(trust=trust, progress=progress))
