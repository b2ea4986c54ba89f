"""Checkpoints of torch.distributed jobs: one commit for all ranks, or none.

Every rank of a job builds the same :class:`~torchkeep.CheckpointManager` and
calls ``save`` and ``restore`` with its own objects; this module is what the
manager does then.

- :class:`Group` is the manager's own gloo process group (made once, by every
  rank, when the manager is built), on which ranks exchange what they need:
  each rank's own state (RNG streams, data position), the staging area of a
  save, and its outcome. Its collectives run on the CPU and are bounded by the
  manager's ``timeout``; a rank that died is noticed as soon as its
  connection drops. Training's own collectives never share it, so a save in
  a background thread cannot deadlock with them.
- Replicated state (DistributedDataParallel) is written by the coordinator
  (rank 0) alone, as an ordinary checkpoint.
- Sharded state (DTensor, FSDP2's ``fully_shard``) is written through
  ``torch.distributed.checkpoint`` (DCP), which plans who writes which piece;
  :class:`KeepWriter` stores each rank's pieces as one checksummed safetensors
  shard in the save's staging area, and the coordinator writes the manifest
  (each piece a tensor entry, and which pieces make up each whole tensor) and
  commits only after DCP has collected every rank's results. Reading goes
  through :class:`KeepReader`, so a checkpoint saved by N ranks loads on M:
  DCP asks each rank's pieces of the stored ones, every one verified.
"""

from __future__ import annotations

import contextlib
import datetime
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from torchkeep.dtypes import torch_dtype_from_name, torch_dtype_name
from torchkeep.errors import (
    CorruptCheckpointError,
    DistributedError,
    InvalidArgumentError,
    TorchkeepError,
    UnsupportedObjectError,
)
from torchkeep.formats.shard import plan_tensors, write_shard
from torchkeep.formats.source import ManifestSource
from torchkeep.manifest import MANIFEST_NAME, Chunk, ChunkedTensor, ShardedManifest, ShardEntry, TensorEntry
from torchkeep.storage import Storage
from torchkeep.tree import ArrayLeaf, encode_tree

__all__ = ["Group", "KeepReader", "KeepWriter", "flatten_for_dcp", "is_sharded", "load_sharded", "save_sharded"]

_T = TypeVar("_T")
#: Where each rank's own state (RNG streams, data position) is kept in a distributed checkpoint's tree.
RANKS_KEY = "_torchkeep_ranks"


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - a torch without DTensor
        return None
    return DTensor


@dataclass
class Group:
    """The ranks of a job as a checkpoint sees them, and the manager's own gloo group to talk on."""

    rank: int
    size: int
    pg: Any
    coordinator: int  # the global rank of the group's rank 0
    timeout: float

    @classmethod
    def of(cls, process_group: Any, timeout: float) -> Group | None:
        """The job's group when torch.distributed is initialized (or ``process_group`` given), else None.

        Every rank must call this at the same point: making the group is a collective.
        """
        if process_group is False or not (dist.is_available() and dist.is_initialized()):
            if process_group not in (None, False):
                raise InvalidArgumentError("process_group= was given but torch.distributed is not initialized.")
            return None
        parent = None if process_group is None or process_group is True else process_group
        # new_group returns NON_GROUP_MEMBER on the ranks it leaves out.
        outside = parent is dist.GroupMember.NON_GROUP_MEMBER
        if parent is not None and not outside and not isinstance(parent, dist.ProcessGroup):
            raise InvalidArgumentError(
                f"process_group must be a torch.distributed ProcessGroup, True, False or None, not {parent!r}."
            )
        if outside or (parent is not None and dist.get_rank(parent) < 0):
            raise InvalidArgumentError(
                f"Rank {dist.get_rank()} is not in the process_group given; only that group's ranks build this manager."
            )
        ranks = None if parent is None else dist.get_process_group_ranks(parent)
        try:
            # Of a given group, only its ranks build the manager: only they take part in making its own.
            pg = dist.new_group(ranks=ranks, backend="gloo", timeout=datetime.timedelta(seconds=timeout),
                                use_local_synchronization=ranks is not None)  # fmt: skip
        except Exception as exc:
            raise DistributedError(f"Could not make the checkpoint's process group: {exc}") from exc
        return cls(
            rank=dist.get_rank(pg), size=dist.get_world_size(pg), pg=pg,
            coordinator=dist.get_global_rank(pg, 0), timeout=timeout,
        )  # fmt: skip

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    def call(self, what: str, fn: Callable[[], _T]) -> _T:
        """Run a collective; a rank that died or did not come within the timeout is a :class:`DistributedError`."""
        try:
            return fn()
        except TorchkeepError:
            raise
        except Exception as exc:
            raise DistributedError(
                f"Rank {self.rank} of {self.size}: {what} failed: another rank died, raised, or did not answer "
                f"within {self.timeout:g} s ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})."
            ) from exc

    def gather(self, what: str, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on the coordinator (None elsewhere). Small Python values only."""
        out: list[Any] | None = [None] * self.size if self.is_coordinator else None
        self.call(what, lambda: dist.gather_object(obj, out, dst=self.coordinator, group=self.pg))
        return out

    def broadcast(self, what: str, obj: Any) -> Any:
        """The coordinator's ``obj`` on every rank."""
        box = [obj]
        self.call(what, lambda: dist.broadcast_object_list(box, src=self.coordinator, group=self.pg))
        return box[0]

    def any(self, what: str, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank."""
        value = torch.tensor([int(flag)])
        self.call(what, lambda: dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.pg))
        return bool(value.item())

    def outcome(self, what: str, error: BaseException | None) -> None:
        """Share the coordinator's outcome of ``what``; every other rank raises if it failed."""
        message = self.broadcast(what, None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if message is not None:
            raise DistributedError(f"Rank {self.rank} of {self.size}: {what} failed on the coordinator: {message}")


# -- which state is whose ---------------------------------------------------------------------


def is_per_rank(obj: Any) -> bool:
    """Whether a state is each rank's own: a data sampler or a loader tracking one (the data position)."""
    from torch.utils.data import Sampler

    from torchkeep.data import TrackedLoader

    return isinstance(obj, (Sampler, TrackedLoader))


def rank_state(name: str, obj: Any) -> Any:
    """The state of a per-rank object; torch's DistributedSampler has no state_dict, only its epoch."""
    if callable(getattr(obj, "state_dict", None)):
        return obj.state_dict()
    if isinstance(obj, torch.utils.data.DistributedSampler):
        return {"epoch": obj.epoch}
    raise UnsupportedObjectError(
        f"Cannot save the per-rank state {name!r}: a {type(obj).__name__} has no state_dict().", key=name
    )


def load_rank_state(obj: Any, state: Any) -> None:
    if callable(getattr(obj, "load_state_dict", None)):
        obj.load_state_dict(state)
    elif isinstance(obj, torch.utils.data.DistributedSampler):
        obj.set_epoch(int(state["epoch"]))


# -- sharded state: through torch.distributed.checkpoint ------------------------------------------


def is_sharded(tree: Any) -> bool:
    """Whether a state tree holds a DTensor anywhere (FSDP2, tensor parallel): it goes through DCP."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return False
    return any(isinstance(t, dtensor) for t in _tensors(tree))


def _tensors(tree: Any) -> Iterator[Any]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)


def modules_of(state: dict[str, Any]) -> dict[str, nn.Module]:
    return {name: obj for name, obj in state.items() if isinstance(obj, nn.Module)}


def model_for(name: str, optimizer: torch.optim.Optimizer, modules: dict[str, nn.Module]) -> nn.Module:
    """The module among the saved ones whose parameters ``optimizer`` updates."""
    wanted = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for module in modules.values():
        if wanted <= {id(p) for p in module.parameters()}:
            return module
    raise InvalidArgumentError(
        f"The optimizer {name!r} updates parameters of no module passed to the same call; a sharded optimizer "
        "is saved and restored together with its model: pass the model too (model=..., optimizer=...).",
        key=name,
    )


def sharded_states(state: dict[str, Any]) -> dict[str, Any]:
    """The state dicts of a sharded job, the optimizer's keyed by parameter name (as DCP needs them)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    modules = modules_of(state)
    out: dict[str, Any] = {}
    for name, obj in state.items():
        if isinstance(obj, nn.Module):
            out[name] = get_model_state_dict(obj)
        elif isinstance(obj, torch.optim.Optimizer):
            out[name] = get_optimizer_state_dict(model_for(name, obj, modules), obj)
        elif callable(getattr(obj, "state_dict", None)):
            out[name] = obj.state_dict()
        else:
            out[name] = obj
    return out


def apply_sharded(state: dict[str, Any], loaded: dict[str, Any], *, strict: bool = True) -> None:
    """Put loaded sharded state dicts back into their objects (see :func:`sharded_states`)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    modules = modules_of(state)
    for name, obj in state.items():
        if isinstance(obj, nn.Module):
            set_model_state_dict(obj, loaded[name], options=StateDictOptions(strict=strict))
        elif isinstance(obj, torch.optim.Optimizer):
            set_optimizer_state_dict(model_for(name, obj, modules), obj, loaded[name])
        elif callable(getattr(obj, "load_state_dict", None)):
            obj.load_state_dict(loaded[name])
        elif isinstance(obj, dict):
            obj.clear()
            obj.update(loaded[name])


@dataclass
class Flat:
    """A tree split for DCP: its JSON node, the torch tensors DCP writes by name, and the other arrays."""

    node: Any
    tensors: dict[str, torch.Tensor]
    others: list[ArrayLeaf]


def flatten_for_dcp(tree: Any) -> Flat:
    """Name every torch tensor (DTensor or not) by its place in the tree, as the manifest's tree names it.

    The same tree shape gives the same names on every rank and at every load,
    which is what DCP matches pieces by.
    """
    stand_ins: dict[int, torch.Tensor] = {}

    def swap(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            stand_in = torch.empty(0, dtype=value.dtype)
            stand_ins[id(stand_in)] = value
            return stand_in
        if isinstance(value, dict):
            items = [(k, swap(v)) for k, v in value.items()]
            return dict(items) if type(value) is dict else type(value)(items)
        if isinstance(value, list):
            return [swap(v) for v in value]
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(swap(v) for v in value)
        return value

    swapped = swap(tree)
    node, leaves = encode_tree(swapped)
    tensors: dict[str, torch.Tensor] = {}
    others: list[ArrayLeaf] = []
    for leaf in leaves:
        original = stand_ins.get(id(leaf.value))
        if original is None:
            others.append(leaf)
        else:
            tensors[leaf.name] = original
    # Keep the stand-ins alive until their ids were looked up (an id is reused once its object is gone).
    del swapped
    return Flat(node, tensors, others)


def _chunk_name(fqn: str, offsets: Any) -> str:
    return f"{fqn}@{','.join(str(int(o)) for o in offsets)}" if offsets is not None else fqn


class KeepWriter:
    """A DCP storage writer: each rank's pieces as one checksummed safetensors shard in the save's staging.

    ``sink`` is where this rank's shard goes (the save's transaction on the
    coordinator, a share of it elsewhere); ``others`` are arrays DCP does not
    carry (numpy arrays, the ranks' own state), written by the coordinator in
    its shard. ``finish`` (the coordinator's, once every rank's results are
    in) writes the manifest into the staging; the caller commits.
    """

    def __init__(self, sink: Any, rank: int, *, node: Any, others: list[ArrayLeaf], metadata: dict[str, Any]) -> None:
        self.sink = sink
        self.shard = f"rank-{rank:05d}.safetensors"
        self.node = node
        self.others = others
        self.metadata = metadata
        self.manifest: ShardedManifest | None = None
        self.error: BaseException | None = None  # this rank's own failure, raised as itself

    # The StorageWriter interface (duck-typed: DCP calls these and nothing else).
    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: Any) -> Any:
        return plan

    def prepare_global_plan(self, plans: list[Any]) -> list[Any]:
        return plans

    def storage_meta(self) -> Any:
        return None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True

    def write_data(self, plan: Any, planner: Any) -> torch.futures.Future[list[Any]]:
        from torch.distributed.checkpoint.planner import WriteItemType
        from torch.distributed.checkpoint.storage import WriteResult

        try:
            leaves: list[ArrayLeaf] = []
            items = {}
            for item in plan.items:
                if item.type == WriteItemType.BYTE_IO:
                    raise UnsupportedObjectError(
                        f"{item.index.fqn!r} is not a tensor; torchkeep keeps such values in its manifest.",
                        key=item.index.fqn,
                    )
                data = planner.resolve_data(item).detach()
                name = _chunk_name(item.index.fqn, item.index.offset)
                leaves.append(ArrayLeaf(name, data.cpu() if data.device.type != "cpu" else data))
                items[name] = item
            if self.is_coordinator:
                leaves.extend(self.others)
            results = []
            if leaves:
                with self.sink.open(self.shard) as f:
                    entries, size = write_shard(f, plan_tensors(leaves), self.shard, {"format": "pt"})
                for entry in entries:
                    item = items.get(entry.name)
                    index = item.index if item is not None else _other_index(entry.name)
                    results.append(WriteResult(index=index, size_in_bytes=entry.nbytes, storage_data=(entry, size)))
        except BaseException as exc:
            self.error = exc
            raise
        future: torch.futures.Future[list[Any]] = torch.futures.Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Any, results: list[list[Any]]) -> None:
        """On the coordinator: the manifest, from DCP's metadata and every rank's entries."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        try:
            entries: list[TensorEntry] = []
            shards: dict[str, int] = {}
            for rank_results in results:
                for result in rank_results:
                    entry, size = result.storage_data
                    entries.append(entry)
                    shards[entry.shard] = size
            chunked: dict[str, ChunkedTensor] = {}
            for fqn, md in metadata.state_dict_metadata.items():
                if not isinstance(md, TensorStorageMetadata):
                    raise UnsupportedObjectError(f"{fqn!r} is not a tensor.", key=fqn)
                chunks = tuple(
                    Chunk(entry=_chunk_name(fqn, c.offsets), offsets=tuple(int(o) for o in c.offsets))
                    for c in md.chunks
                )
                chunked[fqn] = ChunkedTensor(
                    dtype=torch_dtype_name(md.properties.dtype), shape=tuple(int(s) for s in md.size), chunks=chunks
                )
            self.manifest = ShardedManifest(
                tree=self.node,
                tensors=tuple(sorted(entries, key=lambda e: (e.shard, e.offsets[0]))),
                shards=tuple(ShardEntry(file=name, size=size) for name, size in sorted(shards.items())),
                metadata=self.metadata,
                format_version=3,
                chunked=chunked,
            )
            with self.sink.open(MANIFEST_NAME) as f:
                f.write(self.manifest.to_bytes())
        except BaseException as exc:
            self.error = exc
            raise


def _other_index(name: str) -> Any:
    from torch.distributed.checkpoint.metadata import MetadataIndex

    return MetadataIndex(name)


class KeepReader:
    """A DCP storage reader over an opened sharded checkpoint: pieces read by name and verified."""

    def __init__(self, source: ManifestSource) -> None:
        self.source = source
        self.error: BaseException | None = None

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import (
            ChunkStorageMetadata,
            Metadata,
            MetadataIndex,
            TensorProperties,
            TensorStorageMetadata,
        )

        entries = {e.name: e for e in self.source.manifest.tensors}
        described: dict[str, Any] = {}
        storage: dict[Any, str] = {}
        for fqn, whole in self.source.chunked.items():
            chunks = []
            for chunk in whole.chunks:
                offsets = torch.Size(chunk.offsets)
                chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(entries[chunk.entry].shape)))
                storage[MetadataIndex(fqn, offsets)] = chunk.entry
            properties = TensorProperties(dtype=torch_dtype_from_name(whole.dtype, path=self.source.path))
            described[fqn] = TensorStorageMetadata(properties=properties, size=torch.Size(whole.shape), chunks=chunks)
        return Metadata(state_dict_metadata=described, storage_data=storage)

    def set_up_storage_reader(self, metadata: Any, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: Any) -> Any:
        return plan

    def prepare_global_plan(self, plans: list[Any]) -> list[Any]:
        return plans

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True

    def read_data(self, plan: Any, planner: Any) -> torch.futures.Future[None]:
        try:
            names = {self.storage_data[item.storage_index] for item in plan.items}
            # Copied out of the mapped file first, checked after: bytes that changed in between fail the check.
            pieces, _ = self.source.read_arrays(verify=False, names=names)
            for item in plan.items:
                piece = pieces[self.storage_data[item.storage_index]]
                assert isinstance(piece, torch.Tensor)
                window = tuple(slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths, strict=True))
                target = planner.resolve_tensor(item).detach()
                target.copy_(piece[window])
                planner.commit_tensor(item, target)
            self.source.read_arrays(verify=True, build=False, names=names)
        except BaseException as exc:
            self.error = exc
            raise
        future: torch.futures.Future[None] = torch.futures.Future()
        future.set_result(None)
        return future


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it assumes one process when torch.distributed is not initialized: that is what is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _dcp_failure(
    what: str, group: Group | None, own: BaseException | None, exc: BaseException, *, saving: bool
) -> BaseException:
    """The error a rank raises when DCP failed: its own failure as itself, another rank's as DistributedError."""
    if own is not None and isinstance(own, TorchkeepError):
        return own
    where = "" if group is None else f"Rank {group.rank} of {group.size}: "
    tail = "; nothing was committed." if saving else "."
    failures = getattr(exc, "failures", None)  # DCP's CheckpointException: each failed rank's exception
    if isinstance(failures, dict) and failures:
        causes = []
        for rank, failure in sorted(failures.items()):
            cause = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(cause, CorruptCheckpointError) and own is None:
                # Another rank found damage: every rank treats the checkpoint as damaged.
                return CorruptCheckpointError(f"{where}{what}: rank {rank} found damage: {cause}", path=cause.path)
            causes.append(f"rank {rank}: {type(cause).__name__}: {_first_line(cause)}")
        return DistributedError(f"{where}{what} failed ({'; '.join(causes)}){tail}")
    return DistributedError(f"{where}{what} failed: {type(exc).__name__}: {_first_line(exc)}{tail}")


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def save_sharded(
    group: Group | None, storage: Storage, key: str, flat: Flat, metadata: dict[str, Any]
) -> ShardedManifest | None:
    """Write a sharded checkpoint with DCP and commit it once every rank has written its part.

    Returns the manifest on the coordinator (None elsewhere). Raises on every
    rank when any rank failed or died; nothing is committed then.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    coordinator = group is None or group.is_coordinator
    txn = None
    token: str | None = None
    error: BaseException | None = None
    if coordinator:
        try:
            txn = storage.begin(key, directory=True)
            share = getattr(txn, "share", None)
            if group is not None and share is None:
                raise InvalidArgumentError(
                    f"{storage!r} cannot be written by several processes; a distributed save needs a local (shared) "
                    "folder or an object store."
                )
            token = share() if share is not None and group is not None else ""
        except BaseException as exc:
            error = exc
    if group is not None:
        token = group.broadcast("opening the save", None if error is not None else token)
    if token is None or error is not None:
        if error is not None:
            raise error
        raise DistributedError(
            f"Rank {group.rank if group else 0}: the coordinator could not begin the save of {key!r}."
        )
    sink: Any = txn if coordinator else storage.join(key, token)  # type: ignore[attr-defined]
    writer = KeepWriter(sink, 0 if group is None else group.rank, node=flat.node, others=flat.others, metadata=metadata)
    try:
        try:
            with _quiet_single_process():
                dcp.save(flat.tensors, storage_writer=writer, process_group=None if group is None else group.pg,
                         no_dist=group is None)  # fmt: skip
        except (Exception, CheckpointException) as exc:
            raise _dcp_failure(f"the save of {key!r}", group, writer.error, exc, saving=True) from exc
        finally:
            if not coordinator:
                sink.close()
        commit_error: BaseException | None = None
        if coordinator:
            assert txn is not None
            try:
                txn.commit()
            except BaseException as exc:
                commit_error = exc
        if group is not None:
            group.outcome(f"the commit of {key!r}", commit_error)
        elif commit_error is not None:
            raise commit_error
    except BaseException:
        if txn is not None:
            txn.abort()
        raise
    return writer.manifest if coordinator else None


def load_sharded(group: Group | None, source: ManifestSource, targets: dict[str, torch.Tensor]) -> None:
    """Fill ``targets`` (named as :func:`flatten_for_dcp` names them) in place from a sharded checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader = KeepReader(source)
    try:
        with _quiet_single_process():
            dcp.load(targets, storage_reader=reader, process_group=None if group is None else group.pg,
                     no_dist=group is None)  # fmt: skip
    except (Exception, CheckpointException) as exc:
        if isinstance(exc, TorchkeepError):
            raise
        raise _dcp_failure(f"reading {source.path!r}", group, reader.error, exc, saving=False) from exc
