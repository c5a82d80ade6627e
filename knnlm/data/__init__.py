"""Data preparation: raw corpora to fairseq-binarized folders with a ``meta.json``.

``knnlm prepare`` is the command-line front end of :mod:`knnlm.data.prepare`;
later steps read a prepared folder's record with :func:`read_data_meta`.
"""

from knnlm.data.binarize import SplitStats
from knnlm.data.meta import DataMeta, read_data_meta
from knnlm.data.prepare import Tokenization, prepare_corpus, prepare_demo, prepare_wikitext
from knnlm.data.sources import WIKITEXT, RawSplit

__all__ = [
    "WIKITEXT",
    "DataMeta",
    "RawSplit",
    "SplitStats",
    "Tokenization",
    "prepare_corpus",
    "prepare_demo",
    "prepare_wikitext",
    "read_data_meta",
]
