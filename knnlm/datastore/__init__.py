"""Datastores of kNN keys, FAISS indexes over them, and exact search.

The API the evaluation code uses::

    store = Datastore.open("datastores/wt103/ffn", key_dim=1024, dictionary_sha256=...)
    index = KnnIndex.load("indexes/wt103.ffn.faiss", store, nprobe=32)
    scores, ids = index.search(queries, k=1024)          # approximate ("faiss mask/score")
    exact_scores = rescore(queries, ids, store, "l2")    # "real score"
    scores, ids = exact_topk(queries, store, 1024, "l2") # "real mask"

Scores are similarities, higher is better: IP ``q·k``, L2 ``−‖q−k‖²``.
"""

from knnlm.datastore.build import DatastoreBuildConfig, build_datastore
from knnlm.datastore.exact import exact_topk, rescore
from knnlm.datastore.index import IndexBuildConfig, KnnIndex, auto_factory, build_index
from knnlm.datastore.shards import merge_datastores, merge_index_ondisk, open_index_shards
from knnlm.datastore.similarity import SIMILARITIES, Similarity
from knnlm.datastore.store import Datastore, write_datastore
from knnlm.io import dictionary_fingerprint
from knnlm.models.windows import ContextPlan, TokenStream

__all__ = [
    "SIMILARITIES",
    "ContextPlan",
    "Datastore",
    "DatastoreBuildConfig",
    "IndexBuildConfig",
    "KnnIndex",
    "Similarity",
    "TokenStream",
    "auto_factory",
    "build_datastore",
    "build_index",
    "dictionary_fingerprint",
    "exact_topk",
    "merge_datastores",
    "merge_index_ondisk",
    "open_index_shards",
    "rescore",
    "write_datastore",
]
