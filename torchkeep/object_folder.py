"""A manager directory's ``objects`` folder: where incremental checkpoints keep tensors by content.

The folder's layout and how one object is written are in
:mod:`torchkeep.formats.objects`; this module decides which objects may go.
An object is deleted only when no committed checkpoint refers to it (mark and
sweep after each commit or deletion), and nothing is deleted while any
checkpoint's manifest cannot be read, since what it refers to is unknown.
"""

from __future__ import annotations

import warnings

from torchkeep.formats.objects import OBJECTS, is_object_name
from torchkeep.run_directory import RunDirectory
from torchkeep.storage import join_key

__all__ = ["ObjectFolder"]


class ObjectFolder:
    """The object folder of one run directory."""

    def __init__(self, run: RunDirectory) -> None:
        self.run = run
        self.key = join_key(run.prefix, OBJECTS)

    def sweep(self) -> list[str]:
        """Delete the objects no committed checkpoint refers to; return their names."""
        storage = self.run.storage
        stored = [n for n in storage.list(self.key) if is_object_name(n)]
        if not stored:
            return []
        referenced = self.run.references()
        if referenced is None:
            warnings.warn(
                f"Not removing unused objects of {storage.describe(self.run.prefix)!r}: a checkpoint there "
                "cannot be read, so what it refers to is unknown.",
                RuntimeWarning,
                stacklevel=3,
            )
            return []
        removed = [name for name in stored if name not in referenced]
        for name in removed:
            storage.delete(join_key(self.key, name))
        return removed
