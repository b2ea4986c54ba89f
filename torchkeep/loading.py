"""``torchkeep.load``, ``inspect`` and ``verify``: every format torchkeep reads, without pickle."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Union

import torch

from torchkeep.errors import InvalidArgumentError
from torchkeep.formats.detect import (
    NATIVE,
    SAFETENSORS,
    SAFETENSORS_SHARDED,
    TORCH_LEGACY,
    TORCH_ZIP,
    detect_format,
)
from torchkeep.formats.native import open_native
from torchkeep.formats.pth import crc_check, load_pth
from torchkeep.formats.safetensors_file import open_safetensors, open_sharded_safetensors
from torchkeep.formats.tensors import OpenedCheckpoint, read_arrays
from torchkeep.info import CheckpointInfo, TensorInfo, VerifyReport
from torchkeep.storage import Storage, resolve
from torchkeep.tree import decode_tree

__all__ = ["MapLocation", "inspect", "load", "verify"]

MapLocation = Union[  # noqa: UP007 - kept readable for Python 3.10 users
    None, str, torch.device, dict[str, str], Callable[[torch.Tensor, str], torch.Tensor]
]

_OPENERS: dict[str, Callable[[Storage, str], OpenedCheckpoint]] = {
    NATIVE: open_native,
    SAFETENSORS: open_safetensors,
    SAFETENSORS_SHARDED: open_sharded_safetensors,
}


def open_manifest(storage: Storage, key: str, fmt: str) -> OpenedCheckpoint:
    """Open a safetensors-based checkpoint (native, single or sharded) of the given format."""
    return _OPENERS[fmt](storage, key)


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
    storage: Storage | None = None,
) -> Any:
    """Load a checkpoint of any supported format and return its state tree.

    Native checkpoints and safetensors files are memory-mapped: tensors view the
    file's pages (copy-on-write), so loading costs no second copy in private
    memory. ``.pth`` files go through torch's restricted ``weights_only``
    unpickler only, never plain pickle.

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
    fmt = detect_format(st, key)
    if fmt in (TORCH_ZIP, TORCH_LEGACY):
        ml: Any = "cpu" if map_location is None else map_location
        obj = load_pth(st, key, zip_format=fmt == TORCH_ZIP, map_location=ml, trust=trust)
        return _cast_tree(obj, dtype) if dtype is not None else obj
    opened = _OPENERS[fmt](st, key)
    arrays, _ = read_arrays(st, opened, verify=verify)
    devices = {e.name: e.device for e in opened.manifest.tensors}
    placed = {
        name: _cast(_place(value, devices[name], map_location, name, opened.path), dtype)
        for name, value in arrays.items()
    }
    return decode_tree(opened.manifest.tree, placed, path=opened.path)


def _torch_info(obj: Any) -> tuple[Any, list[TensorInfo]]:
    """Replace each tensor of a loaded torch file with a TensorInfo, naming them by their path."""
    tensors: list[TensorInfo] = []

    def walk(value: Any, parts: list[str]) -> Any:
        if isinstance(value, torch.Tensor):
            info = TensorInfo(
                name=".".join(parts) or "tensor",
                kind="torch",
                dtype=str(value.dtype).removeprefix("torch."),
                shape=tuple(value.shape),
                nbytes=value.numel() * value.element_size(),
                device=str(value.device),
            )
            tensors.append(info)
            return info
        if isinstance(value, dict):
            return {k: walk(v, [*parts, str(k)]) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(walk(v, [*parts, str(i)]) for i, v in enumerate(value))
        return value

    return walk(obj, []), tensors


def inspect(path: str | os.PathLike[str], *, storage: Storage | None = None) -> CheckpointInfo:
    """Describe a checkpoint (dtypes, shapes, sizes, metadata, tree) without reading tensor data.

    For torch zip files the tensors are memory-mapped and not touched; a legacy
    (non-zip) torch file has to be read whole.
    """
    st, key = resolve(path, storage)
    fmt = detect_format(st, key)
    if fmt in (TORCH_ZIP, TORCH_LEGACY):
        obj = load_pth(st, key, zip_format=fmt == TORCH_ZIP, map_location="cpu")
        tree, tensors = _torch_info(obj)
        return CheckpointInfo(path=st.describe(key), format=fmt, format_version=None, tree=tree, tensors=tuple(tensors))
    opened = _OPENERS[fmt](st, key)
    manifest = opened.manifest
    infos = {
        e.name: TensorInfo(
            name=e.name, kind=e.kind, dtype=e.dtype, shape=e.shape, nbytes=e.nbytes,
            device=e.device, shard=f"../objects/{e.shard}" if e.shard in opened.shared else (e.shard or None),
            checksum=e.checksum or None, shared=e.shard in opened.shared,
        )
        for e in manifest.tensors
    }  # fmt: skip
    return CheckpointInfo(
        path=opened.path,
        format=fmt,
        format_version=manifest.format_version if manifest.provenance else None,  # None: not written by torchkeep
        tree=decode_tree(manifest.tree, infos, path=opened.path, placeholders=True),
        tensors=tuple(infos.values()),
        metadata=manifest.metadata,
        provenance=manifest.provenance,
        created=manifest.created or None,
    )


def verify(path: str | os.PathLike[str], *, storage: Storage | None = None) -> VerifyReport:
    """Re-read every byte of a checkpoint and check it against its checksums.

    Returns a report when everything is intact. Files without checksums
    (foreign safetensors, legacy torch files) are parsed completely instead.

    Raises:
        ChecksumMismatchError: names every damaged tensor (or zip record).
        CorruptCheckpointError: the structure is damaged.
    """
    st, key = resolve(path, storage)
    fmt = detect_format(st, key)
    where = st.describe(key)
    if fmt == TORCH_ZIP:
        nbytes = crc_check(st, key)
        obj = load_pth(st, key, zip_format=True, map_location="cpu")
        return VerifyReport(where, fmt, len(_torch_info(obj)[1]), nbytes, "crc32")
    if fmt == TORCH_LEGACY:
        obj = load_pth(st, key, zip_format=False, map_location="cpu")
        tensors = _torch_info(obj)[1]
        return VerifyReport(where, fmt, len(tensors), sum(t.nbytes for t in tensors), "structure")
    opened = _OPENERS[fmt](st, key)
    entries = opened.manifest.tensors
    _, nbytes = read_arrays(st, opened, verify=True, build=False)
    if all(e.checksum for e in entries):
        return VerifyReport(where, fmt, len(entries), nbytes, "xxh3-64")
    # No checksums to compare (a foreign file): the headers and every offset were checked.
    return VerifyReport(where, fmt, len(entries), sum(e.nbytes for e in entries), "structure")
