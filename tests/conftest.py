"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

# The golden values live beside the repository, in the workspace's shared folder (see its README.md).
GOLDEN_DIR = Path(__file__).resolve().parents[2] / "shared" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Folder of golden reference values (`NAME.json` + `NAME.npz`); skips the test when it is absent."""
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden reference values not found at {GOLDEN_DIR} (they live outside the repository)")
    return GOLDEN_DIR
