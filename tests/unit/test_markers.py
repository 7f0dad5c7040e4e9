"""Selecting with -m integration / -m e2e drops no test of those folders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _collected(*args: str) -> int:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return sum(1 for line in out.splitlines() if "::" in line)


@pytest.mark.parametrize("folder", ["integration", "e2e"])
def test_the_folder_marker_selects_every_test_of_the_folder(folder: str) -> None:
    everything = _collected(f"tests/{folder}")
    assert everything > 0
    assert _collected(f"tests/{folder}", "-m", folder) == everything
