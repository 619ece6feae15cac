"""Shared fixtures: the prepared data root (prepared on demand; idempotent and quick once done) and
scratch copies of it for tests that damage files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fewer.data.prepare import OPTIONAL_STEPS, prepare
from fewer.data.store import ENV_VAR, read_manifest, write_manifest

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
    """A private copy of the prepared root (wheel cache included, so re-preparing needs no network),
    without the optional corpora (tens of MB; they have their own tests), which leave the manifest too."""
    copy = tmp_path / "data"
    optional = [step.name for step in OPTIONAL_STEPS]
    shutil.copytree(data_dir, copy, ignore=shutil.ignore_patterns(".lock", "*.tmp*", *optional))
    manifest = read_manifest(copy)
    if any(name in manifest.get("steps", {}) for name in optional):
        for name in optional:
            manifest["steps"].pop(name, None)
        manifest["files"] = {rel: entry for rel, entry in manifest["files"].items()
                             if entry.get("step") not in optional}
        write_manifest(copy, manifest)
    return copy
