"""Writes the golden checkpoints. Run once per format version; never rewrite an existing one."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torchkeep
from tests.golden import GOLDEN_METADATA, golden_state

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    torchkeep.save(golden_state(), here / "golden-v1", metadata=GOLDEN_METADATA)
    torchkeep.save(golden_state(), here / "golden-v1.safetensors", metadata=GOLDEN_METADATA)
