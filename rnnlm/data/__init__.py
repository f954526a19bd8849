"""Text in, token ids out (D2L 8.2-8.3): where the text comes from, how it is cleaned and
tokenised (with an on-disk cache), the vocabulary, train/val/test splits, and the two
minibatch iterators of D2L 8.3.4 (sequential and random).

May import: rnnlm.errors and rnnlm.files (safe writes of the cache and the download). Nothing
else of rnnlm (a DataConfig is read, never imported at run time): the config, the models, the
BPTT code and the training run are built on this package, never the other way round.
"""

from rnnlm.data.corpus import PREPROCESSORS, Corpus, Vocab, load_corpus
from rnnlm.data.iterators import BatchIterator
from rnnlm.data.sources import DataError

__all__ = ["PREPROCESSORS", "BatchIterator", "Corpus", "DataError", "Vocab", "load_corpus"]
