from __future__ import annotations

import shutil
from pathlib import Path

import pytest

DIGITS = Path(__file__).resolve().parents[2] / "daemon" / "models" / "digits"


@pytest.fixture
def digits_dir(tmp_path) -> Path:
    """A copy of the embedded digits model directory (model, labels, calibration cache)."""
    dst = tmp_path / "repo" / "digits"
    shutil.copytree(DIGITS, dst, ignore=shutil.ignore_patterns("data", "README.md"))
    return dst
