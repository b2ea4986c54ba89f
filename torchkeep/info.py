"""What ``inspect`` and ``verify`` report about a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["CheckpointInfo", "TensorInfo", "VerifyReport"]


def human_size(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor or array, described without reading its data.

    Attributes:
        name: its unique name in the checkpoint (the tensor's name in the shard).
        kind: ``"torch"`` or ``"numpy"``.
        dtype: a torch dtype name (``"float32"``) or numpy dtype string (``"<f4"``).
        shape: its shape.
        nbytes: its size in bytes.
        device: the device it was saved from.
        shard: the data file holding it (None for torch files); ``../objects/...``
            for a tensor shared with other checkpoints of a manager directory.
        checksum: its xxh3-64 checksum, or None where the format carries none.
        shared: whether it lives in the manager directory's object folder, shared by content.
    """

    name: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    device: str = "cpu"
    shard: str | None = None
    checksum: str | None = None
    shared: bool = False


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint holds, from its manifest or headers alone.

    Attributes:
        path: where it is.
        format: ``"torchkeep"``, ``"safetensors"``, ``"safetensors-sharded"``,
            ``"torch-zip"`` or ``"torch-legacy"``.
        format_version: the torchkeep format version, None for other formats.
        tree: the state tree with a :class:`TensorInfo` in place of each tensor.
        tensors: every stored tensor, each once even if the tree refers to it twice.
        metadata: the user's metadata.
        provenance: the versions of torchkeep, torch, numpy and Python that wrote it.
        created: when it was written (ISO 8601, UTC), or None when unknown.
    """

    path: str
    format: str
    format_version: int | None
    tree: Any
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, str] = field(default_factory=dict)
    created: str | None = None

    @property
    def nbytes(self) -> int:
        """Total bytes of tensor data."""
        return sum(t.nbytes for t in self.tensors)

    def __str__(self) -> str:
        version = f" v{self.format_version}" if self.format_version else ""
        lines = [f"{self.path}  ({self.format}{version}, {len(self.tensors)} tensors, {human_size(self.nbytes)})"]
        if self.created:
            lines.append(f"created {self.created}")
        if self.metadata:
            lines.append(f"metadata {self.metadata}")
        width = max([len(t.name) for t in self.tensors] + [4])
        lines.append(f"{'name':<{width}}  {'dtype':<14} {'shape':<20} {'size':>10}")
        for t in self.tensors:
            shape = "[" + ", ".join(map(str, t.shape)) + "]"
            mark = "  shared" if t.shared else ""
            lines.append(f"{t.name:<{width}}  {t.dtype:<14} {shape:<20} {human_size(t.nbytes):>10}{mark}")
        return "\n".join(lines)


@dataclass(frozen=True)
class VerifyReport:
    """The result of :func:`torchkeep.verify` on a checkpoint that passed.

    Attributes:
        path: where it is.
        format: as in :class:`CheckpointInfo`.
        tensors: how many tensors (or torch zip records) were checked.
        nbytes: how many bytes were read and checked.
        method: what the check compared: ``"xxh3-64"`` per tensor, ``"crc32"`` per
            zip record, or ``"structure"`` where the format carries no checksums
            (every byte was still read and parsed).
    """

    path: str
    format: str
    tensors: int
    nbytes: int
    method: str

    def __str__(self) -> str:
        return f"OK {self.path}: {self.tensors} tensors, {human_size(self.nbytes)} checked ({self.method})"
