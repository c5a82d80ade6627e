"""One way to search a datastore: FAISS (optionally re-scored from the stored keys) or exact.

``knnlm eval retrieve``, the one-pass ``fairseq-eval-lm`` task and generation all
search through :class:`Retriever`, so the choice of mask and score source, the
option checks and their messages exist once::

    retriever = Retriever.open("datastores/wt2/att", index="indexes/wt2.att.l2.faiss", real_score=True)
    scores, ids = retriever.search(queries, k=1024)     # float32 [Q, k], int64 [Q, k], best first
    vals = retriever.values_of(ids)                      # next-token ids, −1 for missing neighbours

Scores follow :mod:`knnlm.datastore.similarity`: IP ``q·k``, L2 ``−‖q−k‖²``.
"""

from __future__ import annotations

import os

import numpy as np

from knnlm.datastore.exact import exact_topk, rescore
from knnlm.datastore.index import KnnIndex
from knnlm.datastore.similarity import Similarity, check_similarity
from knnlm.datastore.store import Datastore
from knnlm.errors import KnnlmError


def check_search_options(has_index: bool, similarity: str | None, real_score: bool, nprobe: int | None) -> None:
    """Refuse search options that contradict each other, before any datastore or index is opened or locked."""
    if real_score and not has_index:
        raise KnnlmError(
            "--real-score (--knn-sim-func recomp in fairseq-eval-lm) re-scores FAISS neighbours: "
            "give --index (--indexfile) too"
        )
    if not has_index and similarity is None:
        raise KnnlmError(
            "exact search needs --similarity l2|ip (--knn-similarity in fairseq-eval-lm): "
            "there is no index to take it from"
        )
    if not has_index and nprobe is not None:
        raise KnnlmError("--nprobe applies to an index; exact search has none")
    if similarity is not None:
        check_similarity(similarity)


class Retriever:
    """A datastore, an optional FAISS index over it, the similarity, and where scores come from."""

    def __init__(
        self,
        store: Datastore,
        index: KnnIndex | None,
        similarity: Similarity,
        real_score: bool = False,
        device: str = "auto",
    ) -> None:
        check_search_options(index is not None, similarity, real_score, None)
        self.store = store
        self.index = index
        self.similarity = similarity
        self.real_score = real_score
        self.device = device

    @classmethod
    def open(
        cls,
        datastore: str | os.PathLike | Datastore,
        index: str | os.PathLike | None = None,
        *,
        similarity: str | None = None,
        real_score: bool = False,
        nprobe: int | None = None,
        device: str = "auto",
        key_type: str | None = None,
        mmap: bool = False,
    ) -> Retriever:
        """Open the datastore (and index); ``similarity`` is the index's metric unless exact search.

        ``mmap`` leaves an index's inverted lists on disk (datastores larger than memory).
        """
        check_search_options(bool(index), similarity, real_score, nprobe)
        store = datastore if isinstance(datastore, Datastore) else Datastore.open(datastore, key_type=key_type)
        knn_index = None
        if index:
            knn_index = KnnIndex.load(index, store, nprobe=nprobe, device=device, mmap=mmap)
            if similarity is not None and check_similarity(similarity) != knn_index.similarity:
                raise KnnlmError(
                    f"--similarity {similarity} differs from the metric of {index} ({knn_index.similarity}); "
                    "drop it (the index's metric is used)"
                )
            similarity = knn_index.similarity
        return cls(store, knn_index, check_similarity(similarity), real_score=real_score, device=device)

    @property
    def mask_source(self) -> str:
        """Who chose the neighbours: ``faiss`` (the index) or ``real`` (exact search)."""
        return "faiss" if self.index is not None else "real"

    @property
    def score_source(self) -> str:
        """Where the scores come from: ``faiss`` (the index's codes) or ``real`` (the stored keys)."""
        return "real" if (self.real_score or self.index is None) else "faiss"

    @property
    def num_keys(self) -> int:
        return self.store.num_keys

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores float32 [Q, k], ids int64 [Q, k])``, best first; missing neighbours: id −1, score −inf."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self.store.num_keys)
        if self.index is None:
            return exact_topk(queries, self.store, k, self.similarity, device=self.device)
        scores, ids = self.index.search(queries, k)
        if self.real_score:
            scores = rescore(queries, ids, self.store, self.similarity, device=self.device)
        return scores, ids

    def values_of(self, ids: np.ndarray) -> np.ndarray:
        """Next-token ids of datastore rows ``ids`` (−1 stays −1)."""
        return self.store.values_of(ids)
