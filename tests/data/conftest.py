"""Shared fixtures: the prepared data root (prepared on demand; idempotent and quick once done) and
scratch copies of it for tests that damage files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fewer.data.prepare import prepare
from fewer.data.store import ENV_VAR

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """$FEWER_DATA if set, else the repository's ./data; `fewer data prepare` runs first if needed
    (CI prepares beforehand, so this only checks hashes)."""
    root = Path(os.environ.get(ENV_VAR) or REPO / "data")
    prepare(root, log=lambda message: None)
    return root


@pytest.fixture
def scratch_root(tmp_path: Path, data_dir: Path) -> Path:
    """A private copy of the prepared root (wheel cache included, so re-preparing needs no network)."""
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy, ignore=shutil.ignore_patterns(".lock", "*.tmp*"))
    return copy
