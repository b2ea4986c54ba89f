"""The README's main job, ``make demo``, runs end to end: training, a SIGKILL, an exact resume, damage caught."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_demo_runs_and_says_what_it_shows(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--dir", str(tmp_path / "demo-run")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "bit-for-bit identical to the reference: True" in out.stdout
    assert "restored step 275 instead" in out.stdout
