"""Where prepared data lives, its manifest, and checked access to it.

Everything ``fewer data prepare`` writes sits under one data root with a ``manifest.json`` that
records the sha256 of every prepared file. Loaders never read a file the manifest does not vouch
for: a missing file raises :class:`DataNotPrepared`, a changed one :class:`DataCorrupt`, and both
messages carry the command that rebuilds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
from pathlib import Path
from typing import Any, Iterator

MANIFEST_NAME = "manifest.json"
DEFAULT_ROOT = "data"  # relative to the current directory, like nanoGPT's data/ folder
ENV_VAR = "FEWER_DATA"


class DataNotPrepared(FileNotFoundError):
    """A prepared-data file (or the manifest) is missing; the message says how to build it."""


class DataCorrupt(ValueError):
    """A prepared-data file does not match its manifest entry; the message says how to rebuild it."""


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root`` if given, else ``$FEWER_DATA``, else ``./data`` (read at call time)."""
    if root is not None:
        return Path(root)
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return Path(DEFAULT_ROOT)


def prepare_command(root: Path | None = None, *, force: bool = False) -> str:
    """The exact shell command that (re)builds the data under ``root``."""
    cmd = "fewer data prepare"
    if force:
        cmd += " --force"
    if root is not None and Path(root).resolve() != Path(DEFAULT_ROOT).resolve():
        cmd += " --root " + shlex.quote(str(root))
    return cmd


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest as a dict, or an empty one when absent; an unreadable manifest is DataCorrupt."""
    path = root / MANIFEST_NAME
    if not path.exists():
        return {"files": {}}
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no 'files' table")
    except (ValueError, OSError) as exc:
        raise DataCorrupt(
            f"the data manifest {path} cannot be read ({exc}); rebuild it with: "
            f"{prepare_command(root, force=True)}") from exc
    return manifest


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    write_atomic(root / MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


# (path, size, mtime_ns) -> sha256 of files already checked in this process, so repeated loads of
# the same unchanged file do not hash it again. A rewrite changes mtime, which invalidates the entry.
_verified: dict[tuple[str, int, int], str] = {}


def checked_path(relpath: str, root: str | os.PathLike | None = None) -> Path:
    """The path of prepared file ``relpath`` after checking it exists and matches the manifest."""
    base = data_root(root)
    path = base / relpath
    manifest = read_manifest(base)
    entry = manifest["files"].get(relpath)
    if entry is None or not path.exists():
        what = "is missing" if not path.exists() else "is not listed in the manifest"
        raise DataNotPrepared(
            f"prepared data file {path} {what} (data root: {base.resolve()}; set it with root= or "
            f"${ENV_VAR}); build the offline data with: {prepare_command(base)}")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    digest = _verified.get(key)
    if digest is None:
        digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise DataCorrupt(
            f"prepared data file {path} is corrupt: its sha256 {digest[:16]}... does not match the "
            f"manifest's {entry['sha256'][:16]}...; rebuild it with: {prepare_command(base, force=True)}")
    _verified[key] = digest
    return path


@contextlib.contextmanager
def reading(relpath: str, root: str | os.PathLike | None = None) -> Iterator[Path]:
    """Check ``relpath``, then turn any parse failure inside the block into DataCorrupt."""
    path = checked_path(relpath, root)
    try:
        yield path
    except (DataNotPrepared, DataCorrupt):
        raise
    except Exception as exc:  # a file that hashes right but does not parse: same remedy
        raise DataCorrupt(
            f"prepared data file {path} could not be read ({type(exc).__name__}: {exc}); rebuild it "
            f"with: {prepare_command(data_root(root), force=True)}") from exc


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """An exclusive lock on the data root, so two concurrent prepares do not interleave."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, prepare is still atomic file by file
        yield
        return
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
