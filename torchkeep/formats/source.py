"""What an opened checkpoint offers every reader: its tree, its tensors, mapped or streamed, verified.

Each format has one opener (see :data:`torchkeep.formats.OPENERS`) that turns
a storage key into a source:

- :class:`ManifestSource` for the safetensors-based formats (native
  directories with their plain, compressed and shared shards, single
  ``.safetensors`` files, sharded ones with an index): a manifest, real or
  made up from the headers, says where every tensor's bytes are;
- :class:`TorchFileSource` for torch zip and legacy files, which torch's
  restricted unpickler has to read.

``load``, ``inspect``, ``verify``, ``load_into`` and the manager's ``restore``
all read through a source, so each rule about a format lives in one place.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import torch

from torchkeep.dtypes import torch_dtype_from_name
from torchkeep.errors import ChecksumMismatchError, CorruptCheckpointError
from torchkeep.formats.compressed import read_compressed
from torchkeep.formats.detect import Format
from torchkeep.formats.objects import OBJECT_TENSOR
from torchkeep.formats.pth import crc_check, load_pth
from torchkeep.formats.shard import ShardHeader, entry_dtype, materialize, read_header
from torchkeep.formats.streaming import CopyJob, copy_into
from torchkeep.info import CheckpointInfo, TensorInfo, VerifyReport
from torchkeep.integrity import checksum
from torchkeep.manifest import ChunkedTensor, Manifest, ShardedManifest, TensorEntry
from torchkeep.progress import Progress, Tally
from torchkeep.storage import Storage
from torchkeep.tree import decode_tree, select_node, tensor_names

__all__ = ["ManifestSource", "Place", "Source", "StoredTensor", "TorchFileSource", "checksums"]

#: ``place(name, array, saved_device) -> array``: where a reader wants each array before the tree is rebuilt.
Place = Callable[[str, Any, str], Any]


class StoredTensor(msgspec.Struct, frozen=True, gc=False):
    """Where one tensor's bytes are: a range of a mapped shard, or a zstd frame of a compressed one."""

    entry: TensorEntry
    shard_key: str
    start: int  # the first byte in the shard: of the data (mapped) or of the frame (compressed)
    compressed: bool

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype_from_name(self.entry.dtype, key=self.entry.name)


def _whole_entry(name: str, whole: ChunkedTensor, path: str) -> TensorEntry:
    """A stand-in entry for a whole sharded tensor: its dtype and shape; its bytes are in its chunks."""
    nbytes = math.prod(whole.shape) * torch_dtype_from_name(whole.dtype, path=path, key=name).itemsize
    return TensorEntry(
        name=name, kind="torch", dtype=whole.dtype, shape=whole.shape, nbytes=nbytes, shard="", offsets=(0, 0),
        checksum="",
    )  # fmt: skip


def _damaged_error(path: str, damaged: list[str]) -> ChecksumMismatchError:
    listed = ", ".join(repr(n) for n in damaged[:20]) + (f" and {len(damaged) - 20} more" if len(damaged) > 20 else "")
    return ChecksumMismatchError(
        f"{path!r} is damaged: {len(damaged)} tensor(s) fail their checksum: {listed}. "
        "Restore the checkpoint from a good copy, or load an earlier one.",
        path=path,
        damaged=damaged,
    )


@dataclass(frozen=True, eq=False)
class ManifestSource:
    """A safetensors-based checkpoint whose manifest has been read and checked against its shards.

    Foreign safetensors files get a manifest made up from their headers, with
    empty checksums (they carry none).
    """

    format: Format
    path: str
    storage: Storage
    manifest: Manifest
    shard_keys: dict[str, str]
    compressed: frozenset[str] = frozenset()  # shards of zstd frames rather than safetensors
    shared: frozenset[str] = frozenset()  # one-tensor shards in the manager's object folder

    # -- describing ---------------------------------------------------------------------------

    def placeholder_tree(self, node: Any = None, *, trust: bool = False, verify: bool = True) -> Any:
        """The tree (or the subtree ``node`` of its JSON) with each tensor's :class:`TensorEntry` in its place.

        Registered types and dataclasses are rebuilt (a module's extra state is
        often one); ``info()`` shows them as their saved trees instead.
        """
        tree = self.manifest.tree if node is None else node
        return decode_tree(tree, self.leaf_entries, path=self.path, placeholders=True, build_types=True)

    @property
    def chunked(self) -> dict[str, ChunkedTensor]:
        """The whole tensors of a checkpoint written in pieces by several ranks (empty for any other)."""
        return self.manifest.chunked if isinstance(self.manifest, ShardedManifest) else {}

    def _named_entries(self) -> list[TensorEntry]:
        """The entries the tree names (whole tensors, and arrays stored whole), not the pieces."""
        named = set(tensor_names(self.manifest.tree))
        return [e for name, e in self.leaf_entries.items() if name in named]

    @functools.cached_property
    def leaf_entries(self) -> dict[str, TensorEntry]:
        """The entries the tree names: the stored tensors, or for a sharded checkpoint its whole tensors."""
        entries = {e.name: e for e in self.manifest.tensors}  # in a sharded one: the pieces, and arrays stored whole
        entries.update((name, _whole_entry(name, whole, self.path)) for name, whole in self.chunked.items())
        return entries

    def top_level_names(self) -> list[Any] | None:
        """The keys of the tree's top-level dict, read from the JSON alone; None when it is not a dict."""
        tree = self.manifest.tree
        if isinstance(tree, dict) and tree.get("t") in ("dict", "odict"):
            return [item[0] for item in tree.get("items", []) if isinstance(item, list) and item]
        return None

    def info(self, *, trust: bool = False) -> CheckpointInfo:
        """Describe the tensors without reading them (``trust`` matters to torch files only)."""
        manifest = self.manifest
        infos = {
            e.name: TensorInfo(
                name=e.name, kind=e.kind, dtype=e.dtype, shape=e.shape, nbytes=e.nbytes, device=e.device,
                shard=f"../objects/{e.shard}" if e.shard in self.shared else (e.shard or None),
                checksum=e.checksum or None, shared=e.shard in self.shared,
            )
            for e in (self._named_entries() if self.chunked else manifest.tensors)
        }  # fmt: skip
        return CheckpointInfo(
            path=self.path,
            format=self.format,
            format_version=manifest.format_version if manifest.provenance else None,  # None: not written by us
            tree=decode_tree(manifest.tree, infos, path=self.path, placeholders=True),
            tensors=tuple(infos.values()),
            metadata=manifest.metadata,
            provenance=manifest.provenance,
            created=manifest.created or None,
        )

    @functools.cached_property
    def stored(self) -> dict[str, StoredTensor]:
        """Every tensor by name with where its bytes are, checked against its shard's header."""
        headers: dict[str, ShardHeader] = {}
        located: dict[str, StoredTensor] = {}
        path, storage = self.path, self.storage
        for entry in self.manifest.tensors:
            key = self.shard_keys.get(entry.shard)
            if key is None:
                raise CorruptCheckpointError(
                    f"Tensor {entry.name!r} in {path!r} points to shard {entry.shard!r}, "
                    "which the checkpoint does not list.",
                    path=path,
                    key=entry.name,
                )
            entry_dtype(entry, path=path)  # a dtype this torch has, a size that is its shape's
            begin, end = entry.offsets
            if entry.shard in self.compressed:
                if end > storage.size(key):
                    raise CorruptCheckpointError(
                        f"Tensor {entry.name!r} of {path!r} lies at bytes {begin}..{end} of a "
                        f"{storage.size(key)}-byte shard; the shard is truncated or the manifest damaged.",
                        path=path,
                        key=entry.name,
                    )
                located[entry.name] = StoredTensor(entry, key, begin, compressed=True)
                continue
            header = headers.get(key)
            if header is None:
                header = headers[key] = read_header(storage, key)
            on_disk = header.tensors.get(OBJECT_TENSOR if entry.shard in self.shared else entry.name)
            if on_disk is None or on_disk.data_offsets != entry.offsets:
                raise CorruptCheckpointError(
                    f"Tensor {entry.name!r} is described differently by the manifest and by shard "
                    f"{storage.describe(key)!r}; the checkpoint is damaged.",
                    path=storage.describe(key),
                    key=entry.name,
                )
            if end - begin != entry.nbytes:
                raise CorruptCheckpointError(
                    f"Tensor {entry.name!r} in {path!r} spans {end - begin} bytes "
                    f"but should hold {entry.nbytes}; the manifest is damaged.",
                    path=path,
                    key=entry.name,
                )
            located[entry.name] = StoredTensor(entry, key, header.data_start + begin, compressed=False)
        return located

    # -- mapping ------------------------------------------------------------------------------

    def read_arrays(
        self,
        *,
        verify: bool,
        build: bool = True,
        names: Iterable[str] | None = None,
        copy: bool = False,
        progress: Progress | None = None,
    ) -> tuple[dict[str, torch.Tensor | np.ndarray], int]:
        """Map the shards and view each tensor in place, checking checksums when ``verify``.

        With ``copy`` each tensor is read into private memory instead, and its
        checksum taken over that copy: the values then never change, whatever
        happens to the file later. Compressed tensors are always decompressed
        into private memory, one at a time.
        With ``build=False`` only the checks run (what ``verify`` needs). Every
        damaged tensor is collected before raising, so one error names them all.

        Returns:
            The arrays by name and the number of bytes checked.

        Raises:
            ChecksumMismatchError: one or more tensors' bytes do not match their checksums.
            CorruptCheckpointError: a shard is missing, truncated or disagrees with the manifest.
        """
        wanted = None if names is None else set(names)
        stored = [s for s in self.stored.values() if wanted is None or s.entry.name in wanted]
        stored.sort(key=lambda s: (s.shard_key, s.start))  # front to back in each file
        buffers: dict[str, memoryview] = {}
        mapped: list[tuple[StoredTensor, memoryview]] = []
        for s in stored:
            if s.compressed:
                continue
            if copy:
                own = torch.empty(s.entry.nbytes, dtype=torch.uint8)
                view = own.numpy().data
                self.storage.read_into(s.shard_key, s.start, view)
                mapped.append((msgspec.structs.replace(s, start=0), view))
                continue
            if s.shard_key not in buffers:
                buffers[s.shard_key] = self.storage.map(s.shard_key)
            mapped.append((s, buffers[s.shard_key]))
        tally = Tally(sum(s.entry.nbytes for s in stored), progress) if progress is not None else None
        checked = [(s, buf) for s, buf in mapped if verify and s.entry.checksum]
        digests = checksums([buf[s.start : s.start + s.entry.nbytes] for s, buf in checked], tally)
        damaged = [s.entry.name for (s, _), digest in zip(checked, digests, strict=True) if digest != s.entry.checksum]
        checked_bytes = sum(s.entry.nbytes for s, _ in checked)
        arrays: dict[str, torch.Tensor | np.ndarray] = {}
        for s in (s for s in stored if s.compressed):  # read, decompress and check one tensor at a time
            data = read_compressed(self.storage, s.shard_key, s.entry, path=self.path)
            if tally is not None:
                tally.add(s.entry.nbytes)
            if verify and s.entry.checksum:
                if checksum(data) != s.entry.checksum:
                    damaged.append(s.entry.name)
                    continue
                checked_bytes += s.entry.nbytes
            if build:
                arrays[s.entry.name] = materialize(data, 0, s.entry, path=self.path)
        if tally is not None:
            tally.finish()
        if damaged:
            raise _damaged_error(self.path, damaged)
        if build:
            for s, buf in mapped:
                arrays[s.entry.name] = materialize(buf, s.start, s.entry, path=self.path)
        return arrays, checked_bytes

    def read_tree(self, *, verify: bool, key: Any = None, place: Place | None = None, copy: bool = False) -> Any:
        """The tree, or its subtree under top-level ``key``, with its tensors mapped from the shards.

        ``place(name, array, saved_device)`` may move or cast each array before
        the tree is rebuilt (so a tensor stored once stays one tensor). With
        ``copy`` the tensors are private copies rather than views of the file.
        """
        node = self.manifest.tree if key is None else select_node(self.manifest.tree, key, path=self.path)
        names = tensor_names(node)
        if self.chunked:
            arrays = self.arrays_named(names, verify=verify)
        else:
            arrays, _ = self.read_arrays(verify=verify, names=names, copy=copy)
        if place is not None:
            devices = {e.name: e.device for e in self.leaf_entries.values()}
            arrays = {name: place(name, value, devices[name]) for name, value in arrays.items()}
        return decode_tree(node, arrays, path=self.path)

    def arrays_named(self, names: Iterable[str], *, verify: bool = True) -> dict[str, torch.Tensor | np.ndarray]:
        """Private, verified copies of the arrays the tree names ``names`` (whole tensors of a sharded one)."""
        names = list(names)
        whole = [n for n in names if n in self.chunked]
        out = self._assembled(whole, verify=verify) if whole else {}
        plain = [n for n in names if n not in self.chunked]
        if plain:
            out.update(self.read_arrays(verify=verify, names=plain, copy=True)[0])
        return out

    def _assembled(self, names: Iterable[str], *, verify: bool) -> dict[str, torch.Tensor | np.ndarray]:
        """Whole tensors of a sharded checkpoint, each put together from its chunks (private memory)."""
        wholes = {name: self.chunked[name] for name in names}
        pieces, _ = self.read_arrays(
            verify=verify, names=[c.entry for whole in wholes.values() for c in whole.chunks], copy=True
        )
        out: dict[str, torch.Tensor | np.ndarray] = {}
        for name, whole in wholes.items():
            tensor = torch.empty(whole.shape, dtype=torch_dtype_from_name(whole.dtype, path=self.path))
            for chunk in whole.chunks:
                piece = pieces[chunk.entry]
                assert isinstance(piece, torch.Tensor)
                index = tuple(slice(o, o + n) for o, n in zip(chunk.offsets, piece.shape, strict=True))
                tensor[index] = piece
            out[name] = tensor
        return out

    def check(self, *, trust: bool = False, progress: Progress | None = None) -> VerifyReport:
        """Re-read every byte and compare it with its checksum (``torchkeep.verify``).

        Everything ``load`` checks is checked too: the tree's structure and
        references, every dtype and size, then every byte.
        """
        entries = self.manifest.tensors
        # The structure as load decodes it (types of the user's own are checked, not built).
        decode_tree(self.manifest.tree, self.leaf_entries, path=self.path, placeholders=True)
        _, nbytes = self.read_arrays(verify=True, build=False, progress=progress)
        if all(e.checksum for e in entries):
            return VerifyReport(self.path, self.format, len(entries), nbytes, "xxh3-64")
        # No checksums to compare (a foreign file): the headers and every offset were checked.
        return VerifyReport(self.path, self.format, len(entries), sum(e.nbytes for e in entries), "structure")

    # -- streaming ----------------------------------------------------------------------------

    def stream_into(self, jobs: list[CopyJob], *, verify: bool) -> set[str]:
        """Copy stored tensors into destination tensors; return the keys whose bytes failed their checksum."""
        return copy_into(self.storage, jobs, verify=verify)


@dataclass(eq=False)
class TorchFileSource:
    """A torch zip or legacy file, read only through the pickle scan and torch's ``weights_only`` unpickler."""

    format: Format
    path: str
    storage: Storage
    key: str
    _cache: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def read(self, *, map_location: Any = "cpu", trust: bool = False, verify: bool = False, mmap: bool = True) -> Any:
        """Unpickle the file (scanned first; zip files are memory-mapped where the storage allows).

        With ``verify`` every record of a zip is checked against its CRC-32 first
        (torch itself checks none of them); a legacy file carries no checksums.
        """
        if verify:
            self._check_records()
        zip_format = self.format == Format.TORCH_ZIP
        return load_pth(
            self.storage, self.key, zip_format=zip_format, map_location=map_location, trust=trust, mmap=mmap
        )

    def _check_records(self, *, only_zips: bool = True) -> int:
        """CRC-check every zip record once.

        When loading (``only_zips``), a file that is no zip at all is left to the
        scan and the reader, whose errors say more; ``verify`` checks it as a zip.
        """
        if "crc" not in self._cache:
            is_zip = self.format == Format.TORCH_ZIP and (
                not only_zips or self.storage.read(self.key, 0, 4) == b"PK\x03\x04"
            )
            self._cache["crc"] = crc_check(self.storage, self.key) if is_zip else 0
        return int(self._cache["crc"])

    def _loaded(self, trust: bool = False, verify: bool = False) -> Any:
        if verify:
            self._check_records()
        key = "trusted" if trust else "restricted"
        if key not in self._cache:
            self._cache[key] = self.read(trust=trust)
        return self._cache[key]

    def placeholder_tree(self, node: Any = None, *, trust: bool = False, verify: bool = True) -> Any:
        """The unpickled tree, its records checked when ``verify``; its tensors are real, not placeholders."""
        return self._loaded(trust, verify)

    def top_level_names(self) -> list[Any] | None:
        tree = self._loaded()
        return list(tree) if isinstance(tree, Mapping) else None

    def info(self, *, trust: bool = False) -> CheckpointInfo:
        tree, tensors = _torch_info(self._loaded(trust))
        return CheckpointInfo(
            path=self.path, format=self.format, format_version=None, tree=tree, tensors=tuple(tensors)
        )

    def check(self, *, trust: bool = False, progress: Progress | None = None) -> VerifyReport:
        nbytes = self._check_records(only_zips=False)  # the records first
        tensors = _torch_info(self._loaded(trust))[1]
        if self.format == Format.TORCH_ZIP:
            report = VerifyReport(self.path, self.format, len(tensors), nbytes, "crc32")
        else:
            report = VerifyReport(self.path, self.format, len(tensors), sum(t.nbytes for t in tensors), "structure")
        if progress is not None:
            progress(report.nbytes, report.nbytes)
        return report

    def stream_into(self, jobs: list[CopyJob], *, verify: bool) -> set[str]:
        return copy_into(self.storage, jobs, verify=verify)


#: What an opener returns.
Source = ManifestSource | TorchFileSource


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


_PARALLEL_BYTES = 64 * 1024 * 1024


def checksums(views: list[memoryview], tally: Tally | None = None) -> list[str]:
    """Checksums of many buffers, on several threads when there is enough to gain (xxhash drops the GIL).

    Threads take runs of neighbouring buffers of about equal bytes, not one
    buffer each, so many small tensors do not cost a task apiece.
    """

    def run(batch: list[memoryview]) -> list[str]:
        digests = []
        for view in batch:
            digests.append(checksum(view))
            if tally is not None:
                tally.add(view.nbytes)
        return digests

    total = sum(v.nbytes for v in views)
    workers = min(4, os.cpu_count() or 1)
    if total < _PARALLEL_BYTES or workers == 1:
        return run(views)
    batches: list[list[memoryview]] = [[]]
    size, share = 0, total / (4 * workers)
    for view in views:
        if size >= share:
            batches.append([])
            size = 0
        batches[-1].append(view)
        size += view.nbytes
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="torchkeep-verify") as pool:
        return [digest for batch in pool.map(run, batches) for digest in batch]
