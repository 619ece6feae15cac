"""Shakespeare corpus, tokenizer and token-stream loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewer.data import TokenBatches, eval_batches, load_corpus, load_texts
from fewer.data.text import EOT, VAL_PLAYS, clean_play_markdown

from .tolerances import TOLERANCES


@pytest.fixture(scope="module")
def corpus(data_dir):
    return load_corpus(root=data_dir)


@pytest.fixture(scope="module")
def texts(data_dir):
    return load_texts(root=data_dir)


# ---------------------------------------------------------------------------------------- corpus

def test_splits_are_disjoint_whole_plays(corpus, texts):
    assert set(texts["train"]).isdisjoint(texts["val"])
    assert len(texts["train"]) + len(texts["val"]) == TOLERANCES["num_plays"]
    assert tuple(texts["val"]) == VAL_PLAYS == corpus.val_docs
    assert tuple(texts["train"]) == corpus.train_docs
    # a line only Macbeth has must be in validation and nowhere in training
    line = "When shall we three meet again"
    assert line in texts["val"]["macbeth"]
    assert not any(line in play for play in texts["train"].values())


def test_token_streams_decode_to_the_split_texts(corpus, texts):
    assert corpus.train.dtype == np.uint16 and corpus.val.dtype == np.uint16
    for split, tokens in (("train", corpus.train), ("val", corpus.val)):
        assert int(tokens.max()) < corpus.vocab_size
        assert int((tokens == corpus.eot_id).sum()) == len(texts[split])  # one separator per play
        assert corpus.decode(tokens) == "".join(texts[split].values())  # decode drops the separators


def test_token_counts(corpus):
    assert corpus.vocab_size == TOLERANCES["vocab_size"]
    assert corpus.train.size >= TOLERANCES["min_train_tokens"]
    low, high = TOLERANCES["val_token_fraction"]
    assert low < corpus.val.size / (corpus.train.size + corpus.val.size) < high


def test_tokenizer_round_trip_on_real_text(corpus, texts):
    for play, text in texts["val"].items():  # text the tokenizer never saw in training
        ids = corpus.encode(text)
        assert corpus.decode(ids) == text, play
    train_play = next(iter(texts["train"].values()))
    assert len(train_play) / len(corpus.encode(train_play)) > TOLERANCES["min_chars_per_token"]


def test_tokenizer_round_trip_outside_the_corpus(corpus):
    # byte-level: any string survives, even characters Shakespeare never used
    for text in ["naïve café — 東京 🎭\n\ttabs  and  spaces ", " leading space", "x"]:
        assert corpus.decode(corpus.encode(text)) == text
    assert corpus.encode(EOT) == [corpus.eot_id]
    assert corpus.decode(torch.tensor(corpus.encode("To be, or not to be"))) == "To be, or not to be"


def test_cleaned_text_has_no_markdown_left(texts):
    for play, text in {**texts["train"], **texts["val"]}.items():
        assert "**" not in text and "\\[" not in text and "&amp;" not in text, play
        assert not any(line.startswith("#") or line.endswith(" ") for line in text.splitlines()), play
        assert "\n\n\n" not in text


def test_clean_play_markdown():
    markdown = ("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO and\nFRANCISCO_\n\n"
                "**BERNARDO**  \nWho's there?  \n_\\[Aside]_ Long live the king\\--  \n\n\n\n"
                "**CLEOMENES & DION**  \nPhilomel, with melody, &amp; c.\n")
    assert clean_play_markdown(markdown) == (
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nEnter BERNARDO and\nFRANCISCO\n\n"
        "BERNARDO\nWho's there?\n[Aside] Long live the king--\n\n"
        "CLEOMENES & DION\nPhilomel, with melody, & c.\n")


def test_tokenizer_training_is_deterministic_and_lossless():
    from fewer.data.text import train_tokenizer
    lines = ["Now is the winter of our discontent", "Made glorious summer by this sun of York;",
             "And all the clouds that lour'd upon our house"] * 20
    first, second = train_tokenizer(lines, vocab_size=300), train_tokenizer(lines, vocab_size=300)
    assert first.to_str() == second.to_str() and first.get_vocab_size() == 300
    assert first.token_to_id(EOT) == 0
    ids = first.encode(lines[1]).ids
    assert len(ids) < len(lines[1].encode()) and first.decode(ids) == lines[1]


def test_unknown_corpus_is_refused(data_dir):
    with pytest.raises(ValueError, match="name='tinystories'.*'shakespeare'"):
        load_corpus("tinystories", root=data_dir)


# ---------------------------------------------------------------------------------- TokenBatches

STREAM = np.arange(10_000, dtype=np.int64) * 7 % 4093  # distinct neighbours: a window shows where it came from


def test_batch_shapes_and_shift():
    x, y = TokenBatches(STREAM, batch_size=5, seq_len=33, seed=3).batch(0)
    assert x.shape == y.shape == (5, 33) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_batches_are_windows_of_the_stream(corpus):
    loader = TokenBatches(corpus.train, batch_size=4, seq_len=64, seed=11)
    x, y = loader.batch(7)
    for row, start in enumerate(loader.starts(7)):
        window = torch.from_numpy(corpus.train[start:start + 65].astype(np.int64))
        assert torch.equal(x[row], window[:-1]) and torch.equal(y[row], window[1:])


def test_batch_is_a_function_of_seed_and_step():
    a = TokenBatches(STREAM, batch_size=8, seq_len=16, seed=5)
    b = TokenBatches(STREAM, batch_size=8, seq_len=16, seed=5)  # a "resumed" loader: no state carried
    assert all(torch.equal(a.batch(s)[0], b.batch(s)[0]) for s in (0, 1, 999))
    assert torch.equal(a.batch(3)[0], a.batch(3)[0])
    assert not torch.equal(a.batch(3)[0], a.batch(4)[0])
    assert not torch.equal(a.batch(3)[0], TokenBatches(STREAM, 8, 16, seed=6).batch(3)[0])
    stream = iter(a)
    assert all(torch.equal(next(stream)[0], a.batch(s)[0]) for s in range(3))


def test_ranks_split_one_global_batch():
    whole = TokenBatches(STREAM, batch_size=12, seq_len=16, seed=2).batch(9)[0]
    parts = [TokenBatches(STREAM, 4, 16, seed=2, rank=r, world_size=3).batch(9)[0] for r in range(3)]
    assert torch.equal(torch.cat(parts), whole)  # global batch independent of how it is split
    assert not torch.equal(parts[0], parts[1]) and not torch.equal(parts[1], parts[2])


def test_windows_cover_the_whole_stream_including_the_end():
    tokens = np.arange(20)
    loader = TokenBatches(tokens, batch_size=64, seq_len=4)
    starts = np.concatenate([loader.starts(s) for s in range(20)])
    assert starts.min() == 0 and starts.max() == 20 - 4 - 1


def test_seq_len_may_use_the_whole_split():
    x, y = TokenBatches(np.arange(9), batch_size=2, seq_len=8).batch(0)
    assert torch.equal(x[0], torch.arange(8)) and torch.equal(y[0], torch.arange(1, 9))


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=-1, seq_len=8), "batch_size=-1"),
    (dict(batch_size=0, seq_len=8), "batch_size=0"),
    (dict(batch_size=True, seq_len=8), "batch_size=True"),
    (dict(batch_size=2, seq_len=10_000), "seq_len=10000 is too long.*10001 tokens.*has 10000"),
    (dict(batch_size=2, seq_len=0), "seq_len=0"),
    (dict(batch_size=2, seq_len=8, rank=2, world_size=2), "rank=2.*world_size=2"),
    (dict(batch_size=2, seq_len=8, world_size=0), "world_size=0"),
    (dict(batch_size=2, seq_len=8, seed=-1), "seed=-1"),
    (dict(batch_size=2.5, seq_len=8), "batch_size=2.5"),
])
def test_bad_loader_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenBatches(STREAM, **kwargs)


def test_bad_tokens_and_steps():
    with pytest.raises(ValueError, match="1-D integer"):
        TokenBatches(STREAM.reshape(100, 100), 2, 8)
    with pytest.raises(ValueError, match="1-D integer"):
        TokenBatches(STREAM.astype(np.float32), 2, 8)
    with pytest.raises(ValueError, match="step=-1"):
        TokenBatches(STREAM, 2, 8).batch(-1)


# ---------------------------------------------------------------------------------- eval_batches

def test_eval_batches_are_contiguous_non_overlapping_windows(corpus):
    seq_len, batch_size = 256, 7
    batches = list(eval_batches(corpus.val, batch_size, seq_len))
    windows = (corpus.val.size - 1) // seq_len
    assert sum(x.shape[0] for x, _ in batches) == windows
    assert batches[-1][0].shape[0] == windows - batch_size * (len(batches) - 1)  # the last may be short
    xs = torch.cat([x for x, _ in batches]).flatten()
    ys = torch.cat([y for _, y in batches]).flatten()
    val = torch.from_numpy(corpus.val.astype(np.int64))
    assert torch.equal(xs, val[:windows * seq_len]) and torch.equal(ys, val[1:windows * seq_len + 1])


def test_eval_batches_limits_and_errors():
    assert len(list(eval_batches(STREAM, 4, 10, max_batches=3))) == 3
    assert len(list(eval_batches(np.arange(11), 4, 10))) == 1
    with pytest.raises(ValueError, match="seq_len=11 is too long"):
        list(eval_batches(np.arange(11), 4, 11))
    with pytest.raises(ValueError, match="batch_size=-2"):
        list(eval_batches(STREAM, -2, 10))
