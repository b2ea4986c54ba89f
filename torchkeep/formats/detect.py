"""Telling formats apart by their bytes, not by their file names."""

from __future__ import annotations

import enum

from torchkeep.errors import (
    CheckpointNotFoundError,
    InvalidArgumentError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)
from torchkeep.manifest import MANIFEST_NAME
from torchkeep.storage import Storage

__all__ = ["FILESET_NAME", "TORCH_SUFFIXES", "Format", "detect_format", "is_safetensors_head"]

#: File suffixes saved as a torch zip, the format ``torch.save`` writes.
TORCH_SUFFIXES = ("pth", "pt", "bin", "ckpt")
#: The file that seals a folder another engine wrote (see :mod:`torchkeep.formats.fileset`).
FILESET_NAME = "torchkeep-files.json"


class Format(str, enum.Enum):
    """The formats torchkeep reads; the value is the name ``inspect`` and the CLI show."""

    NATIVE = "torchkeep"
    SAFETENSORS = "safetensors"
    SAFETENSORS_SHARDED = "safetensors-sharded"
    TORCH_ZIP = "torch-zip"
    TORCH_LEGACY = "torch-legacy"
    FILESET = "fileset"  # a folder of another engine's files, sealed with torchkeep-files.json

    def __str__(self) -> str:
        return self.value

    @classmethod
    def for_path(cls, key: str) -> Format:
        """The format a path asks for by its name when saving: a suffix picks a single file.

        ``.safetensors`` is a safetensors file; ``.pth``, ``.pt``, ``.bin`` and
        ``.ckpt`` (what torch, Hugging Face and Lightning users type) a torch zip;
        a name without a suffix a native checkpoint directory. Any other suffix
        is refused rather than silently made into a directory.

        Raises:
            InvalidArgumentError: a suffix torchkeep does not write.
        """
        name = key.rsplit("/", 1)[-1]
        suffix = name.rsplit(".", 1)[-1].lower() if "." in name.lstrip(".") else ""
        if suffix == "safetensors":
            return cls.SAFETENSORS
        if suffix in TORCH_SUFFIXES:
            return cls.TORCH_ZIP
        if not suffix or suffix.isdigit() or not suffix.isalpha():
            return cls.NATIVE  # "step-3", "run.2", "epoch-3.5": no file suffix
        raise InvalidArgumentError(
            f"{name!r} ends in .{suffix}, a kind of file torchkeep does not write. Save to NAME.safetensors, "
            f"NAME.{', NAME.'.join(TORCH_SUFFIXES)} (a torch zip that torch.load opens), or a name "
            "without a suffix for a native checkpoint directory."
        )


# torch's legacy (non-zip) files open with its magic number pickled at protocol 2.
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
# safetensors refuses a header longer than this (its MAX_HEADER_SIZE).
_SAFETENSORS_MAX_HEADER = 100_000_000


def is_safetensors_head(head: bytes) -> bool:
    """Whether a file's first bytes are a safetensors header: its little-endian length, then ``{``.

    Asked before taking a file for a pickle: a header of 640 bytes (0x280)
    begins the file with ``80 02``, the bytes a protocol-2 pickle begins with.
    """
    return len(head) >= 9 and head[8:9] == b"{" and 1 < int.from_bytes(head[:8], "little") <= _SAFETENSORS_MAX_HEADER


def detect_format(storage: Storage, key: str) -> Format:
    """Which format the entry at ``key`` is in.

    Raises:
        CheckpointNotFoundError: nothing is there, or a directory without a manifest.
        UnsupportedFormatError: the bytes match no format torchkeep reads.
    """
    path = storage.describe(key)
    if not storage.exists(key):
        raise CheckpointNotFoundError(f"No checkpoint at {path!r}.", path=path)
    if storage.is_dir(key):
        names = storage.list(key)
        if MANIFEST_NAME in names:
            return Format.NATIVE
        if FILESET_NAME in names:
            return Format.FILESET
        if sum(n.endswith(".safetensors.index.json") for n in names) == 1:
            return Format.SAFETENSORS_SHARDED
        raise CheckpointNotFoundError(
            f"{path!r} is a directory without {MANIFEST_NAME} or {FILESET_NAME}, so it is not a committed "
            "checkpoint (an interrupted save leaves neither). Load a checkpoint directory, a file, or a "
            "directory holding one *.safetensors.index.json.",
            path=path,
        )
    if key.endswith(".safetensors.index.json"):
        return Format.SAFETENSORS_SHARDED
    head = storage.read(key, 0, 16)
    if head[:4] == b"PK\x03\x04":
        return Format.TORCH_ZIP
    if head.startswith(_TORCH_LEGACY_MAGIC):
        return Format.TORCH_LEGACY
    if is_safetensors_head(head):
        return Format.SAFETENSORS
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        raise UnsafeCheckpointError(
            f"{path!r} is a plain pickle, not a torch or safetensors file; torchkeep never unpickles "
            "arbitrary data. Re-save the tensors with torchkeep.save or safetensors.",
            path=path,
        )
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1:
        return Format.SAFETENSORS
    # The bytes match nothing: trust the name, so that a damaged file gets its format's error.
    if key.endswith(".safetensors"):
        return Format.SAFETENSORS
    if key.lower().endswith(tuple(f".{suffix}" for suffix in TORCH_SUFFIXES)):
        return Format.TORCH_ZIP
    raise UnsupportedFormatError(
        f"{path!r} is not a checkpoint torchkeep can read (first bytes {head[:8]!r}); it reads native "
        "checkpoint directories, .safetensors (single or sharded with an index) and torch .pth/.pt files.",
        path=path,
    )
