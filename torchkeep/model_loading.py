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
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union

import numpy as np
import torch
from torch import nn

from torchkeep.compare import flatten_tree
from torchkeep.dtypes import torch_dtype_name
from torchkeep.errors import ChecksumMismatchError, InvalidArgumentError, StateMismatchError
from torchkeep.formats import read_consistently
from torchkeep.formats.source import ManifestSource, Source, StoredTensor, TorchFileSource
from torchkeep.formats.streaming import CopyJob
from torchkeep.loading import MapLocation, read_source
from torchkeep.manifest import TensorEntry
from torchkeep.report import Cast, LoadReport, Mismatch
from torchkeep.storage import Storage, resolve

__all__ = ["Rename", "load_into"]

Rename = Union[None, Mapping[str, str], Sequence[tuple[str, str]], Callable[[str], str]]  # noqa: UP007

# Wrappers that prefix every key: DistributedDataParallel adds "module.", torch.compile "_orig_mod.".
_WRAPPER_PREFIXES = (
    ("module._orig_mod.", "DistributedDataParallel around torch.compile"),
    ("_orig_mod.module.", "torch.compile around DistributedDataParallel"),
    ("module.", "DistributedDataParallel/DataParallel"),
    ("_orig_mod.", "torch.compile"),
)


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


class _Assembled(dict[str, Any]):
    """The whole tree of a sharded checkpoint, read into memory, that still says where it came from."""

    def __init__(self, tree: Any, path: str) -> None:
        super().__init__(tree if isinstance(tree, Mapping) else {})
        self.path = path


def _open(source: Mapping[str, Any] | Source) -> tuple[Source | None, str]:
    """The opened checkpoint behind ``source`` (None for an in-memory state dict) and how to name it."""
    if isinstance(source, _Assembled):
        return None, repr(source.path)
    if isinstance(source, Mapping):
        return None, "the source state dict"
    return source, source.path


def _stream_items(
    source: Source | None, tree: Any, key: str | Sequence[str | int] | None, where: str
) -> dict[str, Any]:
    """Flat source keys -> a StoredTensor (read later), a tensor in memory, or a plain value."""
    stored = source.stored if isinstance(source, ManifestSource) else {}
    items: dict[str, Any] = {}
    for name, leaf in flatten_tree(_select(tree, key, where)).items():
        if isinstance(leaf, TensorEntry) and leaf.kind == "torch":
            items[name] = stored[leaf.name]
        else:
            items[name] = leaf  # a tensor in memory, a plain value, or a numpy array's entry (modules hold none)
    return items


def _shape_dtype(value: Any) -> tuple[tuple[int, ...], str] | None:
    """Shape and dtype name of a tensor-like source value, None for anything a module cannot take."""
    if isinstance(value, StoredTensor):
        return value.entry.shape, torch_dtype_name(value.dtype)
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), torch_dtype_name(value.dtype)
    return None


def _describe(value: Any) -> tuple[tuple[int, ...], str]:
    tensor_like = _shape_dtype(value)
    if tensor_like is not None:
        return tensor_like
    if isinstance(value, TensorEntry):
        return value.shape, f"numpy {value.dtype}"
    if isinstance(value, np.ndarray):
        return tuple(value.shape), f"numpy {value.dtype.str}"
    return (), type(value).__name__


_MAX_LISTED = 20


def _raise_nothing_loads(module: nn.Module, tree: Any, target: dict[str, Any], where: str, rename: Rename) -> None:
    """Loading no tensor at all is never silent: say why, and which ``key=`` would load the model."""
    wanted = {k for k, v in target.items() if isinstance(v, torch.Tensor)}
    name = type(module).__name__
    best: tuple[int, str] | None = None
    if isinstance(tree, Mapping):
        for top, value in tree.items():
            if isinstance(value, Mapping) and isinstance(top, str):
                found = set(_match_keys(list(flatten_tree(value)), wanted, rename, LoadReport()).values())
                score = len(found & wanted)
                if score and (best is None or score > best[0]):
                    best = (score, top)
    if best is not None:
        raise StateMismatchError(
            f"{where} is a training checkpoint holding {sorted(map(str, tree))}, so none of {name}'s tensors "
            f"are at its top level; {best[1]!r} holds {best[0]} of the {len(wanted)}: pass key={best[1]!r}.",
            report=LoadReport(missing=sorted(wanted)),
            path=where,
        )
    sample = list(flatten_tree(tree))[:5] if isinstance(tree, Mapping) else []
    raise StateMismatchError(
        f"Nothing in {where} fits {name}: none of its {len(wanted)} tensors has a matching key and shape "
        f"(the source has keys like {sample}). Pass key= for a sub-tree, or rename= to map the keys.",
        report=LoadReport(missing=sorted(wanted)),
        path=where,
    )


def _note_meta_left(module: nn.Module, report: LoadReport) -> None:
    """Say which tensors are still on the meta device after an ``assign`` load, and warn."""
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if not left:
        return
    unsaved = set(left) - set(module.state_dict())
    listed = ", ".join(left[:10]) + (f" and {len(left) - 10} more" if len(left) > 10 else "")
    note = (
        f"{len(left)} tensor(s) are still on the meta device and hold no values: {listed}"
        + (f" ({len(unsaved)} of them non-persistent buffers, which no checkpoint holds)" if unsaved else "")
        + "; give them values before a forward pass (set each buffer again, e.g. as the module's "
        "__init__ computes it, or build those submodules on a real device)."
    )
    report.notes.append(note)
    warnings.warn(note, RuntimeWarning, stacklevel=3)


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
    shown = problems[:_MAX_LISTED]
    if len(problems) > _MAX_LISTED:
        shown.append(f"... and {len(problems) - _MAX_LISTED} more (the error's .report lists them all)")
    listed = "\n  ".join(shown)
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
    trust: bool,
) -> LoadReport:
    report = LoadReport()
    target = module.state_dict(keep_vars=True)
    opened, where = _open(source)
    if assign:
        # Private copies: the model's weights must not stay backed by a file that someone may change.
        tree = (
            source
            if opened is None
            else read_source(opened, map_location=map_location, dtype=dtype, verify=verify, trust=trust, mmap=False)
        )
        items = dict(flatten_tree(_select(tree, key, where)))
    else:
        meta = [k for k, v in target.items() if isinstance(v, torch.Tensor) and v.is_meta]
        if meta:
            raise InvalidArgumentError(
                f"{type(module).__name__} has tensors on the meta device ({meta[0]!r}…), which cannot be "
                "copied into; pass assign=True to make the loaded tensors its parameters.",
                key=meta[0],
            )
        tree = source if opened is None else opened.placeholder_tree(trust=trust, verify=verify)
        items = _stream_items(opened, tree, key, where)
    mapping = _match_keys(list(items), set(target), rename, report)
    matched: list[tuple[str, str]] = []
    for source_key, target_key in mapping.items():
        if target_key not in target:
            report.unexpected.append(source_key)
            continue
        matched.append((source_key, target_key))
    mapped = {t for _, t in matched}
    report.missing = [k for k in target if k not in mapped]
    jobs: list[CopyJob] = []
    extras: dict[str, Any] = {}
    for source_key, target_key in matched:
        value, dest = items[source_key], target[target_key]
        if not isinstance(dest, torch.Tensor):
            extras[target_key] = value
            continue
        found_shape, found_dtype = _describe(value)
        if _shape_dtype(value) is None or found_shape != tuple(dest.shape):
            report.mismatched.append(
                Mismatch(target_key, tuple(dest.shape), torch_dtype_name(dest.dtype), found_shape, found_dtype)
            )
            if on_mismatch == "skip":
                report.skipped.append(target_key)
            continue
        jobs.append(CopyJob(value, dest, target_key))
    if not jobs and any(isinstance(v, torch.Tensor) for v in target.values()):
        _raise_nothing_loads(module, tree if key is None else None, target, where, rename)
    _raise_if_blocked(report, strict=strict, on_mismatch=on_mismatch, where=where, target=type(module).__name__)

    if assign:
        assigned = {}
        for job in jobs:
            tensor = job.source
            assert isinstance(tensor, torch.Tensor)
            if dtype is None and tensor.dtype != job.dest.dtype:
                report.cast.append(Cast(job.key, torch_dtype_name(tensor.dtype), torch_dtype_name(job.dest.dtype)))
                tensor = tensor.to(job.dest.dtype)
            assigned[job.key] = tensor
            report.loaded.append(job.key)
        module.load_state_dict({**assigned, **extras}, strict=False, assign=True)
        _note_meta_left(module, report)
        return report

    for job in jobs:
        found = job.source.dtype
        if found != job.dest.dtype:
            report.cast.append(Cast(job.key, torch_dtype_name(found), torch_dtype_name(job.dest.dtype)))
    if opened is None:
        with torch.no_grad():
            for job in jobs:
                job.dest.copy_(job.source)  # type: ignore[arg-type]  # in-memory sources hold tensors
        bad: set[str] = set()
    else:
        bad = opened.stream_into(jobs, verify=verify)
    report.loaded.extend(job.key for job in jobs if job.key not in bad)
    damaged = [job.key for job in jobs if job.key in bad]
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
    source: str | os.PathLike[str] | Mapping[str, Any] | Source,
    *,
    strict: bool = True,
    rename: Rename = None,
    on_mismatch: Literal["error", "skip"] = "error",
    map_location: MapLocation = None,
    dtype: torch.dtype | None = None,
    assign: bool = False,
    key: str | Sequence[str | int] | None = None,
    verify: bool = True,
    trust: bool = False,
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
        source: a checkpoint path in any format :func:`torchkeep.load` reads, an
            in-memory state dict, or a checkpoint already opened by torchkeep.
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
            memory is ever spent on an initialization. The tensors are read
            into private memory (one copy, the model's own), never left as views
            of a file that could change.
        key: load the subtree under this key (or path of keys) of the checkpoint,
            such as ``"model"`` in a training checkpoint.
        verify: check each tensor's checksum as it is read (default).
        trust: for a ``.pth`` holding pickled objects, unpickle it fully (see :func:`torchkeep.load`).
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
    if not isinstance(source, (Mapping, ManifestSource, TorchFileSource)):
        # A path: open it here, so that a checkpoint replaced while it is read is read again.
        st, skey = resolve(source, storage)
        return read_consistently(
            st,
            skey,
            lambda opened: load_into(
                target, opened, strict=strict, rename=rename, on_mismatch=on_mismatch, map_location=map_location,
                dtype=dtype, assign=assign, key=key, verify=verify, trust=trust,
            ),
        )  # fmt: skip
    if isinstance(source, ManifestSource) and source.chunked:
        # Written in pieces by several ranks: the whole tensors (of the part asked for only) are put together first.
        top = key if isinstance(key, str) else key[0] if isinstance(key, (list, tuple)) and key else None
        part = top if top is not None and top in (source.top_level_names() or []) else None
        tree = read_source(source, map_location=map_location, dtype=dtype, verify=verify, key=part, mmap=False)
        source = _Assembled(tree if part is None else {part: tree}, source.path)
        map_location, dtype = None, None
    if isinstance(target, nn.Module):
        return _load_module(
            target, source, key=key, strict=strict, rename=rename, on_mismatch=on_mismatch,
            map_location=map_location, dtype=dtype, assign=assign, verify=verify, trust=trust,
        )  # fmt: skip
    if not (callable(getattr(target, "state_dict", None)) and callable(getattr(target, "load_state_dict", None))):
        raise InvalidArgumentError(
            f"Cannot load into a {type(target).__name__}: it needs state_dict() and load_state_dict()."
        )
    opened, where = _open(source)
    if opened is None:
        state = _select(source, key, where)
    elif isinstance(key, str) and key in (opened.top_level_names() or []):
        state = read_source(
            opened, map_location=map_location, dtype=dtype, verify=verify, trust=trust, key=key, mmap=False
        )
    else:
        tree = read_source(opened, map_location=map_location, dtype=dtype, verify=verify, trust=trust, mmap=False)
        state = _select(tree, key, where)
    report = LoadReport()
    if isinstance(target, torch.optim.Optimizer):
        _check_optimizer(target, state, where, report)
    else:
        report.loaded = [k for k, v in flatten_tree(state).items() if isinstance(v, torch.Tensor)]
    target.load_state_dict(state)
    return report
