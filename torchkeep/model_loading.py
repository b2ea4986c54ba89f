"""``torchkeep.load_into``: load a checkpoint into a module, optimizer or any Stateful, with a report.

For a module, nothing is copied until every key has been matched, so a
strict failure leaves the module untouched and lists every problem at once.
Then tensors stream one at a time from the checkpoint file straight into the
module's own parameters and buffers (on their device, in their dtype); extra
memory stays near one tensor, never the whole model.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Union

import numpy as np
import torch
from torch import nn

from torchkeep.compare import flatten_tree
from torchkeep.dtypes import torch_dtype_from_name, torch_dtype_name
from torchkeep.errors import ChecksumMismatchError, InvalidArgumentError, StateMismatchError
from torchkeep.formats.compressed import read_compressed
from torchkeep.formats.detect import TORCH_LEGACY, TORCH_ZIP, detect_format
from torchkeep.formats.pth import load_pth
from torchkeep.formats.shard import read_header
from torchkeep.integrity import checksum, new_checksum
from torchkeep.loading import MapLocation, load, open_manifest
from torchkeep.manifest import TensorEntry
from torchkeep.report import Cast, LoadReport, Mismatch
from torchkeep.storage import Storage, resolve
from torchkeep.tree import decode_tree

__all__ = ["Rename", "load_into"]

Rename = Union[None, Mapping[str, str], Sequence[tuple[str, str]], Callable[[str], str]]  # noqa: UP007

# Wrappers that prefix every key: DistributedDataParallel adds "module.", torch.compile "_orig_mod.".
_WRAPPER_PREFIXES = (
    ("module._orig_mod.", "DistributedDataParallel around torch.compile"),
    ("_orig_mod.module.", "torch.compile around DistributedDataParallel"),
    ("module.", "DistributedDataParallel/DataParallel"),
    ("_orig_mod.", "torch.compile"),
)


@dataclass(eq=False)
class _Item:
    """One source tensor: in memory already, or described by a manifest entry and streamed from its shard."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    tensor: torch.Tensor | None = None
    entry: TensorEntry | None = None
    shard_key: str = ""
    offset: int = 0
    compressed: bool = False


_PIECE = 4 * 1024 * 1024
_GPU_PIECE = 16 * 1024 * 1024


class _Staging:
    """One reusable buffer for tensors that cannot be read straight into their destination."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self._pieces: list[torch.Tensor] = []

    def pieces(self) -> list[torch.Tensor]:
        """Two pinned buffers of one piece each, for overlapping file reads with copies to a GPU."""
        if not self._pieces:
            self._pieces = [torch.empty(_GPU_PIECE, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        return self._pieces

    def take(self, nbytes: int, *, pinned: bool) -> torch.Tensor:
        if self._buffer is None or self._buffer.numel() < nbytes or self._buffer.is_pinned() != pinned:
            self._buffer = None  # free the old one before allocating
            self._buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        return self._buffer[:nbytes]


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return tensor.detach().reshape(-1).view(torch.uint8).numpy().data


def _select(tree: Any, key: str | Sequence[str | int] | None, where: str) -> Any:
    if key is None:
        return tree
    parts = [key] if isinstance(key, str) else list(key)
    node = tree
    for i, part in enumerate(parts):
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            raise InvalidArgumentError(
                f"{where} has no {'/'.join(map(str, parts[: i + 1]))!r}; "
                f"its top-level keys are {list(tree) if isinstance(tree, dict) else type(tree).__name__}.",
                path=where,
            ) from None
    return node


def _rename_function(rename: Rename) -> Callable[[str], str] | None:
    if rename is None:
        return None
    if callable(rename):
        return rename
    if isinstance(rename, Mapping):
        prefixes = sorted(rename.items(), key=lambda kv: -len(kv[0]))

        def by_prefix(key: str) -> str:
            for old, new in prefixes:
                if key.startswith(old):
                    return new + key[len(old) :]
            return key

        return by_prefix
    try:
        rules = [(re.compile(pattern), replacement) for pattern, replacement in rename]
    except (TypeError, ValueError, re.error) as exc:
        raise InvalidArgumentError(
            f"rename must be a dict of prefixes, a list of (regex, replacement) pairs or a function: {exc}"
        ) from exc

    def by_regex(key: str) -> str:
        for pattern, replacement in rules:
            key = pattern.sub(replacement, key)
        return key

    return by_regex


def _match_keys(source: list[str], target: set[str], rename: Rename, report: LoadReport) -> dict[str, str]:
    """Source key -> target key, after the user's renames and any wrapper prefix fix-up."""
    user = _rename_function(rename)
    renamed = {k: (user(k) if user else k) for k in source}
    if any(not isinstance(v, str) for v in renamed.values()):
        raise InvalidArgumentError("rename must turn every key into a string.")

    def matches(mapping: dict[str, str]) -> int:
        return sum(v in target for v in mapping.values())

    best, best_note = renamed, None
    for prefix, origin in _WRAPPER_PREFIXES:
        stripped = {k: v[len(prefix) :] if v.startswith(prefix) else v for k, v in renamed.items()}
        if matches(stripped) > matches(best):
            count = sum(v.startswith(prefix) for v in renamed.values())
            best, best_note = stripped, f"removed prefix {prefix!r} ({origin}) from {count} source keys"
        added = {k: prefix + v for k, v in renamed.items()}
        if matches(added) > matches(best):
            best, best_note = added, f"added prefix {prefix!r} ({origin}, on the target) to {len(added)} source keys"
    if best_note:
        report.notes.append(best_note)
    seen: dict[str, str] = {}
    for original, final in best.items():
        if final in seen:
            raise InvalidArgumentError(
                f"Source keys {seen[final]!r} and {original!r} both become {final!r} after renaming."
            )
        seen[final] = original
        if final != original:
            report.renamed.append((original, final))
    return best


def _source_items(
    source: Any, key: str | Sequence[str | int] | None, storage: Storage | None
) -> tuple[dict[str, _Item | Any], str, Storage | None]:
    """Flat source keys -> streamable items (tensors) or plain values, reading no tensor data."""
    compressed: frozenset[str] = frozenset()
    if isinstance(source, Mapping):
        tree, where, st = source, "the source state dict", None
    else:
        st, skey = resolve(source, storage)
        fmt = detect_format(st, skey)
        where = st.describe(skey)
        if fmt in (TORCH_ZIP, TORCH_LEGACY):
            tree = load_pth(st, skey, zip_format=fmt == TORCH_ZIP, map_location="cpu")
        else:
            opened = open_manifest(st, skey, fmt)
            tree = decode_tree(
                opened.manifest.tree, {e.name: e for e in opened.manifest.tensors}, path=where, placeholders=True
            )
            shards = {
                name: (k, 0 if name in opened.compressed else read_header(st, k).data_start)
                for name, k in opened.shard_keys.items()
            }
            compressed = opened.compressed
    items: dict[str, _Item | Any] = {}
    for name, leaf in flatten_tree(_select(tree, key, where)).items():
        if isinstance(leaf, torch.Tensor):
            items[name] = _Item(tuple(leaf.shape), leaf.dtype, tensor=leaf)
        elif isinstance(leaf, TensorEntry) and leaf.kind == "torch":
            shard_key, data_start = shards[leaf.shard]
            dtype = torch_dtype_from_name(leaf.dtype, path=where, key=leaf.name)
            items[name] = _Item(
                leaf.shape, dtype, entry=leaf, shard_key=shard_key, offset=data_start + leaf.offsets[0],
                compressed=leaf.shard in compressed,
            )  # fmt: skip
        else:
            items[name] = leaf  # a plain value, or a numpy array's entry (modules hold none)
    return items, where, st


def _describe(value: Any) -> tuple[tuple[int, ...], str]:
    if isinstance(value, _Item):
        return value.shape, torch_dtype_name(value.dtype)
    if isinstance(value, TensorEntry):
        return value.shape, f"numpy {value.dtype}"
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), torch_dtype_name(value.dtype)
    if isinstance(value, np.ndarray):
        return tuple(value.shape), f"numpy {value.dtype.str}"
    return (), type(value).__name__


def _raise_if_blocked(report: LoadReport, *, strict: bool, on_mismatch: str, where: str, target: str) -> None:
    blocking = bool(report.mismatched and on_mismatch == "error") or (strict and not report.ok)
    if not blocking:
        return
    problems = report.problems() if strict else [f"shape mismatch: {m}" for m in report.mismatched]
    hints = []
    if report.mismatched and on_mismatch == "error":
        hints.append('on_mismatch="skip" loads the rest (for a new head on a kept backbone)')
    if strict and (report.missing or report.unexpected):
        hints.append("strict=False loads what matches; rename= maps renamed keys")
    listed = "\n  ".join(problems)
    raise StateMismatchError(
        f"{where} does not fit {target}: {len(problems)} problem(s), nothing was loaded:\n  {listed}\n"
        f"Fix: {'; '.join(hints)}.",
        report=report,
        path=where,
    )


def _load_module(
    module: nn.Module,
    source: Any,
    *,
    key: str | Sequence[str | int] | None,
    strict: bool,
    rename: Rename,
    on_mismatch: str,
    map_location: MapLocation,
    dtype: torch.dtype | None,
    assign: bool,
    verify: bool,
    storage: Storage | None,
) -> LoadReport:
    report = LoadReport()
    target = module.state_dict(keep_vars=True)
    if assign:
        tree = (
            source
            if isinstance(source, Mapping)
            else load(source, map_location=map_location, dtype=dtype, verify=verify, storage=storage)
        )
        where = "the source state dict" if isinstance(source, Mapping) else str(source)
        items: dict[str, Any] = {
            name: _Item(tuple(v.shape), v.dtype, tensor=v) if isinstance(v, torch.Tensor) else v
            for name, v in flatten_tree(_select(tree, key, where)).items()
        }
        st = None
    else:
        items, where, st = _source_items(source, key, storage)
        meta = [k for k, v in target.items() if isinstance(v, torch.Tensor) and v.is_meta]
        if meta:
            raise InvalidArgumentError(
                f"{type(module).__name__} has tensors on the meta device ({meta[0]!r}…), which cannot be "
                "copied into; pass assign=True to make the loaded tensors its parameters.",
                key=meta[0],
            )
    mapping = _match_keys(list(items), set(target), rename, report)
    matched: list[tuple[str, str]] = []
    for source_key, target_key in mapping.items():
        if target_key not in target:
            report.unexpected.append(source_key)
            continue
        matched.append((source_key, target_key))
    mapped = {t for _, t in matched}
    report.missing = [k for k in target if k not in mapped]
    tensor_pairs: list[tuple[_Item, str]] = []
    extras: dict[str, Any] = {}
    for source_key, target_key in matched:
        value, dest = items[source_key], target[target_key]
        if not isinstance(dest, torch.Tensor):
            extras[target_key] = value.tensor if isinstance(value, _Item) else value
            continue
        found_shape, found_dtype = _describe(value)
        if not isinstance(value, _Item) or found_shape != tuple(dest.shape):
            report.mismatched.append(
                Mismatch(target_key, tuple(dest.shape), torch_dtype_name(dest.dtype), found_shape, found_dtype)
            )
            if on_mismatch == "skip":
                report.skipped.append(target_key)
            continue
        tensor_pairs.append((value, target_key))
    _raise_if_blocked(report, strict=strict, on_mismatch=on_mismatch, where=where, target=type(module).__name__)

    if assign:
        assigned = {}
        for item, target_key in tensor_pairs:
            tensor, dest = item.tensor, target[target_key]
            assert tensor is not None
            if dtype is None and tensor.dtype != dest.dtype:
                report.cast.append(Cast(target_key, torch_dtype_name(tensor.dtype), torch_dtype_name(dest.dtype)))
                tensor = tensor.to(dest.dtype)
            assigned[target_key] = tensor
            report.loaded.append(target_key)
        module.load_state_dict({**assigned, **extras}, strict=False, assign=True)
        return report

    for item, target_key in tensor_pairs:
        dest = target[target_key]
        if item.dtype != dest.dtype:
            report.cast.append(Cast(target_key, torch_dtype_name(item.dtype), torch_dtype_name(dest.dtype)))
    bad = _copy_all(st, tensor_pairs, target, verify)
    report.loaded.extend(k for _, k in tensor_pairs if k not in bad)
    damaged = [k for _, k in tensor_pairs if k in bad]
    if extras:
        module.load_state_dict(extras, strict=False)
        report.loaded.extend(extras)
    if damaged:
        raise ChecksumMismatchError(
            f"{where} is damaged: {len(damaged)} tensor(s) fail their checksum: {', '.join(map(repr, damaged))}. "
            f"The rest was loaded into {type(module).__name__}, and these may now hold damaged values: "
            "load a good checkpoint before using it.",
            path=where,
            damaged=damaged,
        )
    return report


def _direct(item: _Item, dest: torch.Tensor) -> bool:
    """Whether the file's bytes can be read straight into ``dest``'s memory."""
    return (
        item.entry is not None
        and not item.compressed  # a compressed frame must be decompressed first
        and dest.device.type == "cpu"
        and dest.dtype == item.dtype
        and dest.is_contiguous()
    )


def _copy_all(
    storage: Storage | None, pairs: list[tuple[_Item, str]], target: dict[str, Any], verify: bool
) -> set[str]:
    """Copy every source tensor into its target tensor; return the keys whose bytes failed their checksum.

    Reads that land straight in a parameter's memory need no buffer, so they run
    on several threads in chunks, then the checksums are taken in place, also on
    several threads (file reads and xxhash release the GIL). The rest go one at
    a time through a single reused staging buffer.
    """
    pairs = sorted(pairs, key=lambda pair: (pair[0].shard_key, pair[0].offset))  # front to back in each file
    unique: dict[tuple[int, int], tuple[_Item, str]] = {}
    for item, key in pairs:  # a tied weight appears under several keys: fill it once
        unique.setdefault((id(item), id(target[key])), (item, key))
    pairs = list(unique.values())
    direct = [(item, key) for item, key in pairs if _direct(item, target[key])]
    staged = [(item, key) for item, key in pairs if not _direct(item, target[key])]
    damaged: set[str] = set()
    if direct:
        assert storage is not None
        # Largest first, so the threads finish together.
        jobs = sorted(direct, key=lambda pair: -(pair[0].entry.nbytes if pair[0].entry else 0))
        workers = min(4, os.cpu_count() or 1, len(jobs))

        def run(pair: tuple[_Item, str]) -> str | None:
            item, key = pair
            assert item.entry is not None
            return _read_and_check(storage, item, _bytes_of(target[key]), key, verify)

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="torchkeep-load") as pool:
            damaged.update(key for key in pool.map(run, jobs) if key is not None)
    to_gpu = [(item, key) for item, key in staged if _streams_to_gpu(item, target[key])]
    if to_gpu:
        assert storage is not None
        # Several tensors at once, each thread with its own pinned pieces and CUDA stream.
        local = threading.local()

        def send(pair: tuple[_Item, str]) -> str | None:
            item, key = pair
            if not hasattr(local, "staging"):
                local.staging = _Staging()
                local.stream = torch.cuda.Stream(target[key].device)
            with torch.cuda.stream(local.stream):
                ok = _copy_to_gpu(storage, item, target[key], local.staging, verify)
            return None if ok else key

        workers = min(8, os.cpu_count() or 1, len(to_gpu))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="torchkeep-load-gpu") as pool:
            damaged.update(key for key in pool.map(send, to_gpu) if key is not None)
    staging = _Staging()
    with torch.no_grad():
        for item, key in staged:
            if _streams_to_gpu(item, target[key]):
                continue
            if not _copy_staged(storage, item, target[key], staging, verify):
                damaged.add(key)
    return damaged


def _read_and_check(storage: Storage, item: _Item, view: memoryview, key: str, verify: bool) -> str | None:
    """Read bytes straight into a tensor's memory; the key if they fail their checksum, else None.

    The checksum is updated piece by piece right after each piece is read,
    while the bytes are still in the CPU cache.
    """
    entry = item.entry
    assert entry is not None
    check = verify and bool(entry.checksum)
    digest = new_checksum()
    for start in range(0, len(view), _PIECE):
        piece = view[start : start + _PIECE]
        storage.read_into(item.shard_key, item.offset + start, piece)
        if check:
            digest.update(piece)
    return key if check and digest.hexdigest() != entry.checksum else None


def _copy_staged(storage: Storage | None, item: _Item, dest: torch.Tensor, staging: _Staging, verify: bool) -> bool:
    """Copy through a staging buffer (another device or dtype); False if the bytes are damaged.

    A damaged tensor leaves ``dest`` untouched, except when it was streamed to a GPU in pieces.
    """
    if item.tensor is not None:
        dest.copy_(item.tensor)
        return True
    entry = item.entry
    assert entry is not None and storage is not None
    if entry.nbytes == 0:
        return True
    if item.compressed:
        data = read_compressed(storage, item.shard_key, entry, path=storage.describe(item.shard_key))
        if verify and entry.checksum and checksum(data) != entry.checksum:
            return False
        dest.copy_(torch.frombuffer(data, dtype=torch.uint8).view(item.dtype).reshape(item.shape))
        return True
    buffer = staging.take(entry.nbytes, pinned=dest.device.type == "cuda")
    view = _bytes_of(buffer)
    storage.read_into(item.shard_key, item.offset, view)
    if verify and entry.checksum and checksum(view) != entry.checksum:
        return False  # dest keeps its value
    dest.copy_(buffer.view(item.dtype).reshape(item.shape))
    return True


def _streams_to_gpu(item: _Item, dest: torch.Tensor) -> bool:
    """Whether the tensor goes to a GPU tensor of its own dtype, in pieces through pinned buffers."""
    return (
        item.entry is not None
        and not item.compressed
        and dest.device.type == "cuda"
        and dest.dtype == item.dtype
        and dest.is_contiguous()
    )


def _copy_to_gpu(storage: Storage, item: _Item, dest: torch.Tensor, staging: _Staging, verify: bool) -> bool:
    """Stream a tensor to the GPU in pieces through two pinned buffers, reading one while the other copies.

    Like a direct read, the bytes land before their checksum is known: on a
    mismatch ``dest`` holds them, and the caller reports the tensor as damaged.
    """
    entry = item.entry
    assert entry is not None
    target = dest.detach().reshape(-1).view(torch.uint8)
    buffers = staging.pieces()
    stream = torch.cuda.current_stream(dest.device)  # the thread's own stream (see _copy_all)
    events = [torch.cuda.Event(), torch.cuda.Event()]
    digest = new_checksum()
    for index, start in enumerate(range(0, entry.nbytes, _GPU_PIECE)):
        slot = index % 2
        if index >= 2:
            events[slot].synchronize()  # the copy out of this buffer has finished
        n = min(_GPU_PIECE, entry.nbytes - start)
        piece = buffers[slot][:n]
        view = _bytes_of(piece)
        storage.read_into(item.shard_key, item.offset + start, view)
        if verify:
            digest.update(view)
        target[start : start + n].copy_(piece, non_blocking=True)
        events[slot].record(stream)
    stream.synchronize()
    return not verify or not entry.checksum or digest.hexdigest() == entry.checksum


def _check_optimizer(optimizer: torch.optim.Optimizer, state: Any, where: str, report: LoadReport) -> None:
    """Name the first parameter group or parameter that does not line up."""

    def fail(problem: str) -> StateMismatchError:
        return StateMismatchError(
            f"{where} does not fit {type(optimizer).__name__}: {problem}. Was it saved for the same model "
            "with the same parameter groups?",
            report=report,
            path=where,
        )

    if not isinstance(state, Mapping) or "state" not in state or "param_groups" not in state:
        raise fail("it is not an optimizer state dict (no 'state' and 'param_groups')")
    ours, theirs = optimizer.param_groups, state["param_groups"]
    if len(ours) != len(theirs):
        raise fail(f"it has {len(theirs)} parameter group(s), the optimizer has {len(ours)}")
    for g, (mine, saved) in enumerate(zip(ours, theirs, strict=True)):
        if len(mine["params"]) != len(saved["params"]):
            raise fail(
                f"param_groups[{g}] holds {len(saved['params'])} parameter(s) in the checkpoint "
                f"and {len(mine['params'])} in the optimizer"
            )
        for i, (param, saved_id) in enumerate(zip(mine["params"], saved["params"], strict=True)):
            for name, value in state["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(param.shape):
                    report.mismatched.append(
                        Mismatch(f"state.{saved_id}.{name}", tuple(param.shape), torch_dtype_name(param.dtype),
                                 tuple(value.shape), torch_dtype_name(value.dtype))
                    )  # fmt: skip
                    raise fail(
                        f"param_groups[{g}] parameter {i}: its {name!r} has shape {list(value.shape)} "
                        f"but the parameter has shape {list(param.shape)}"
                    )
                report.loaded.append(f"state.{saved_id}.{name}")


def load_into(
    target: Any,
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    strict: bool = True,
    rename: Rename = None,
    on_mismatch: Literal["error", "skip"] = "error",
    map_location: MapLocation = None,
    dtype: torch.dtype | None = None,
    assign: bool = False,
    key: str | Sequence[str | int] | None = None,
    verify: bool = True,
    storage: Storage | None = None,
) -> LoadReport:
    """Load a checkpoint into a module, an optimizer or any object with ``load_state_dict``.

    For an ``nn.Module`` every key is matched first (after ``rename`` and
    automatic removal of the ``module.``/``_orig_mod.`` prefixes that
    DistributedDataParallel and ``torch.compile`` add, when that makes keys
    match); a blocking problem raises before anything is copied. Tensors are
    then streamed one at a time from the file into the module's parameters and
    buffers, on their device and in their dtype (a cast is reported), so extra
    memory stays near the largest tensor.

    Args:
        target: an ``nn.Module``, a ``torch.optim.Optimizer``, or any object with
            ``state_dict()``/``load_state_dict()``.
        source: a checkpoint path in any format :func:`torchkeep.load` reads, or
            an in-memory state dict.
        strict: raise :class:`StateMismatchError` listing every missing,
            unexpected and mismatched key. ``False`` loads what matches.
        rename: a dict of prefix replacements (``{"encoder.": "backbone."}``), a
            list of ``(regex, replacement)`` pairs, or a function of the key.
        on_mismatch: ``"error"`` raises on a shape mismatch (even with
            ``strict=False``); ``"skip"`` leaves those tensors as they are.
        map_location: where loaded tensors go when they are not copied into
            existing ones (``assign=True``, optimizers, other objects).
        dtype: cast floating-point tensors when they are not copied into
            existing ones; copies always take the target tensor's dtype.
        assign: make the loaded tensors the module's parameters instead of
            copying into them: with a model built on the ``meta`` device, no
            memory is ever spent on an initialization. The tensors stay mapped
            from the file until written to.
        key: load the subtree under this key (or path of keys) of the checkpoint,
            such as ``"model"`` in a training checkpoint.
        verify: check each tensor's checksum as it is read (default).
        storage: read from this storage, with ``source`` as the key.

    Returns:
        A :class:`LoadReport` of what was loaded, missing, unexpected, mismatched,
        cast and renamed.

    Raises:
        StateMismatchError: the checkpoint does not fit; ``.report`` has the details.
        ChecksumMismatchError: tensor bytes are damaged (see its message for what
            was loaded).

    Example:
        >>> report = torchkeep.load_into(model, "ckpt/step-100", key="model", strict=False)
        >>> print(report)
    """
    if on_mismatch not in ("error", "skip"):
        raise InvalidArgumentError(f'on_mismatch must be "error" or "skip", not {on_mismatch!r}.')
    if isinstance(target, nn.Module):
        return _load_module(
            target, source, key=key, strict=strict, rename=rename, on_mismatch=on_mismatch,
            map_location=map_location, dtype=dtype, assign=assign, verify=verify, storage=storage,
        )  # fmt: skip
    if not (callable(getattr(target, "state_dict", None)) and callable(getattr(target, "load_state_dict", None))):
        raise InvalidArgumentError(
            f"Cannot load into a {type(target).__name__}: it needs state_dict() and load_state_dict()."
        )
    where = "the source state dict" if isinstance(source, Mapping) else str(source)
    tree = (
        source
        if isinstance(source, Mapping)
        else load(source, map_location=map_location, dtype=dtype, verify=verify, storage=storage)
    )
    state = _select(tree, key, where)
    report = LoadReport()
    if isinstance(target, torch.optim.Optimizer):
        _check_optimizer(target, state, where, report)
    else:
        report.loaded = [k for k, v in flatten_tree(state).items() if isinstance(v, torch.Tensor)]
    target.load_state_dict(state)
    return report
