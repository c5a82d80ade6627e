"""The clustered datastore (Xu et al. 2023, Appendix C.3): k-means centroids plus their word mix.

The datastore's keys are clustered with faiss k-means into ``C`` centroids (``c·V``
in the paper); every entry is then assigned to its nearest centroid, and row ``c``
of M is the distribution of the next words of cluster ``c``'s entries. Clusters no
entry fell into are dropped (their row of M would be empty).

Files: ``clusters.npz`` (``centroids`` float32 [C, D]; M as COO ``rows``, ``cols``,
``probs``) and ``meta.json`` written last, naming the datastore it came from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from knnlm.datastore.sampling import sample_sorted
from knnlm.datastore.store import Datastore
from knnlm.errors import KnnlmError
from knnlm.io import write_json_atomic

CLUSTERS_FILE = "clusters.npz"
META_FILE = "meta.json"
FORMAT = "knnlm-clusters"


def _rows(keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(keys[ids], dtype=np.float32)


def build_clusters(
    datastore: Datastore,
    n_clusters: int,
    vocab_size: int,
    *,
    similarity: str = "l2",
    train_size: int = 200_000,
    niter: int = 20,
    seed: int = 1,
    chunk: int = 1 << 16,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(centroids [C', D], M rows, M cols, M probs) with C' <= ``n_clusters`` non-empty clusters."""
    import faiss

    n, dim = datastore.num_keys, datastore.key_dim
    if not 1 <= n_clusters <= n:
        raise KnnlmError(f"--clusters must be in [1, {n}] (the datastore size), got {n_clusters}")
    train_ids = sample_sorted(n, min(n, max(train_size, n_clusters)), seed)
    kmeans = faiss.Kmeans(
        dim, n_clusters, niter=niter, seed=seed, spherical=similarity == "ip",
        max_points_per_centroid=max(256, -(-len(train_ids) // n_clusters)),
    )
    kmeans.train(_rows(datastore.keys, train_ids))
    index = faiss.IndexFlatIP(dim) if similarity == "ip" else faiss.IndexFlatL2(dim)
    index.add(kmeans.centroids)
    assignment = np.empty(n, dtype=np.int64)
    for start in range(0, n, chunk):
        _, nearest = index.search(_rows(datastore.keys, np.arange(start, min(n, start + chunk))), 1)
        assignment[start : start + len(nearest)] = nearest[:, 0]
    vals = np.asarray(datastore.vals, dtype=np.int64)
    if vals.size and (vals.min() < 0 or vals.max() >= vocab_size):
        raise KnnlmError(f"{datastore.path}: values fall outside the vocabulary [0, {vocab_size})")
    pairs, counts = np.unique(assignment * vocab_size + vals, return_counts=True)
    clusters, words = pairs // vocab_size, pairs % vocab_size
    used, rows = np.unique(clusters, return_inverse=True)
    totals = np.bincount(rows, weights=counts)
    return kmeans.centroids[used].astype(np.float32), rows, words, counts / totals[rows]


def save_clusters(out: str | os.PathLike, centroids, rows, cols, probs, meta: dict[str, Any]) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / META_FILE).exists():
        (out / META_FILE).unlink()  # a folder without meta.json is never read as complete
    np.savez(out / CLUSTERS_FILE, centroids=centroids, rows=rows, cols=cols, probs=probs)
    full = {"format": FORMAT, "format_version": 1, "n_clusters": int(len(centroids)), **meta}
    write_json_atomic(out / META_FILE, full)
    return out


def load_clusters(path: str | os.PathLike, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(centroids, sparse M [C, V], meta) of a clusters folder, checked against the vocabulary size."""
    import json

    path = Path(path)
    if not (path / META_FILE).is_file():
        raise KnnlmError(f"{path / META_FILE} is missing: build the clusters with `knnlm replace clusters`")
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise KnnlmError(f"{path / META_FILE} is not a knnlm clusters file (format {meta.get('format')!r})")
    if int(meta.get("vocab_size", vocab_size)) != vocab_size:
        raise KnnlmError(
            f"{path} was built for a vocabulary of {meta['vocab_size']} words, the model has {vocab_size}; "
            f"rebuild the clusters from this model's datastore"
        )
    data = np.load(path / CLUSTERS_FILE)
    centroids = torch.from_numpy(data["centroids"]).float()
    index = torch.from_numpy(np.stack([data["rows"], data["cols"]])).long()
    m = torch.sparse_coo_tensor(index, torch.from_numpy(data["probs"]).float(), (len(centroids), vocab_size))
    return centroids, m.coalesce(), meta
