"""Exact neighbours and exact scores from the stored fp16 keys ("real mask", "real score").

Xu et al. (2023) compare FAISS's approximate neighbours and scores with exact
ones. :func:`exact_topk` is a brute-force top-k: the keys are streamed in chunks
(memory-mapped fp16 → fp32), each chunk searched for every query of a batch and
the per-chunk top-k merged into a running one, so memory is bounded by
``query_batch × (chunk_size + k)`` whatever N is. On the CPU each chunk goes
through faiss's exhaustive kernel (blocked GEMM fused with heap selection, a
``ResultHeap`` merging chunks); on a GPU through a torch matmul and ``topk``.
:func:`rescore` computes the exact score of given neighbour ids.

Scores follow :mod:`knnlm.datastore.similarity`: IP ``q·k``, L2 ``−‖q−k‖²``.
L2 candidates are ranked with the expansion ``2q·k − ‖k‖²`` (one matmul) and
the returned top-k are then re-scored as ``−‖q−k‖²`` from differences, which
avoids the cancellation of the expansion when norms are large.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from knnlm.datastore.similarity import Similarity, check_similarity
from knnlm.errors import KnnlmError
from knnlm.models.devices import resolve_device


def _keys_of(datastore: Any) -> np.ndarray:
    """The [N, D] key array of a :class:`~knnlm.datastore.store.Datastore` or an array itself.

    A datastore's keys are read into memory first when they fit, as fp32 when that
    copy fits (see :meth:`Datastore.load_keys_if_they_fit`): exact search and
    re-scoring gather rows, and fp32 rows need no conversion per query batch.
    """
    if hasattr(datastore, "load_keys_if_they_fit"):
        datastore.load_keys_if_they_fit(dtype=np.float32)
    keys = getattr(datastore, "keys", datastore)
    if not isinstance(keys, np.ndarray) or keys.ndim != 2:
        raise KnnlmError("exact search needs a Datastore or an [N, D] key array")
    return keys


def _queries(queries: np.ndarray, dim: int) -> np.ndarray:
    queries = np.asarray(queries)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise KnnlmError(f"queries must be [Q, {dim}] to match the keys; got {list(queries.shape)}")
    return queries


_CHUNK_BYTES = 256 << 20  # fp32 key chunk of exact_topk
_RESCORE_ELEMENTS = 1 << 22  # gathered key values per re-scoring step (16 MiB of fp32: stays in cache)


def exact_topk(
    queries: np.ndarray,
    datastore: Any,
    k: int,
    similarity: Similarity = "ip",
    device: str | torch.device = "auto",
    chunk_size: int | None = None,
    query_batch: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` neighbours of each query among all keys.

    Returns ``(scores float32 [Q, k], ids int64 [Q, k])``, best first, in the
    score convention (IP: ``q·k``; L2: ``−‖q−k‖²``). Peak extra memory is about
    ``query_batch × (chunk_size + 2k)`` fp32 scores plus one fp32 key chunk on a
    GPU, ``query_batch × 3k`` results plus one key chunk on the CPU. ``query_batch``
    defaults to 4,096 on the CPU (each key chunk is converted once per batch) and
    1,024 on a GPU; ``chunk_size`` to 256 MiB of fp32 keys (262,144 rows at D = 256): on
    the CPU, merging per-chunk top-k lists costs more than the search itself with
    small chunks (k = 1024: 1.5x the matmul at 65,536 rows, 0.9x at 300,000).
    """
    similarity = check_similarity(similarity)
    keys = _keys_of(datastore)
    n, dim = keys.shape
    queries = _queries(queries, dim)
    if not 1 <= k <= n:
        raise KnnlmError(f"k must be in [1, N={n}]; got {k}")
    dev = resolve_device(device)
    if query_batch is None:
        query_batch = 4096 if dev.type == "cpu" else 1024
    if chunk_size is None:
        chunk_size = max(1024, _CHUNK_BYTES // (4 * dim))
    if chunk_size < 1 or query_batch < 1:
        raise KnnlmError("chunk_size and query_batch must be positive")
    out_scores = np.empty((len(queries), k), dtype=np.float32)
    out_ids = np.empty((len(queries), k), dtype=np.int64)
    for q0 in range(0, len(queries), query_batch):
        q_np = np.ascontiguousarray(queries[q0 : q0 + query_batch], dtype=np.float32)
        q = torch.from_numpy(q_np).to(dev)
        if dev.type == "cpu":
            best, best_ids = _scan_faiss(q_np, keys, k, similarity, chunk_size)
        else:
            best, best_ids = _scan(q, keys, k, similarity, dev, chunk_size)
        if similarity == "l2":
            # exact −‖q−k‖² of the winners, from the differences
            best = torch.from_numpy(_scores_of(q_np, keys, best_ids.cpu().numpy(), "l2", dev)).to(dev)
            best, order = torch.sort(best, dim=1, descending=True)
            best_ids = torch.gather(best_ids, 1, order)
        out_scores[q0 : q0 + len(q)] = best.cpu().numpy()
        out_ids[q0 : q0 + len(q)] = best_ids.cpu().numpy()
    return out_scores, out_ids


def _scan_faiss(
    q: np.ndarray, keys: np.ndarray, k: int, similarity: Similarity, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k over key chunks with faiss's exhaustive search (CPU), best first.

    Returns ranking scores: IP ``q·k``; L2 ``−‖q−k‖²`` as faiss computes it from the
    norm expansion (the caller re-scores the winners from differences).
    """
    import faiss

    ip = similarity == "ip"
    metric = faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2
    heap = faiss.ResultHeap(len(q), k, keep_max=ip)
    for c0 in range(0, len(keys), chunk_size):
        chunk = np.ascontiguousarray(keys[c0 : c0 + chunk_size], dtype=np.float32)
        dist, ids = faiss.knn(q, chunk, min(k, len(chunk)), metric=metric)
        ids += c0
        heap.add_result(dist, ids)
    heap.finalize()
    scores = torch.from_numpy(heap.D if ip else -heap.D)
    return scores, torch.from_numpy(heap.I.astype(np.int64, copy=False))


def _scan(
    q: torch.Tensor, keys: np.ndarray, k: int, similarity: Similarity, dev: torch.device, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k over key chunks (ranking scores; for L2 the ``−‖q‖²`` term is left out).

    Once k candidates are held, a chunk only contributes the scores above the
    current k-th best of their query: a comparison and a ``nonzero`` replace a
    full ``topk`` of the chunk, which on CPU costs a third of the matmul at k=1024.
    """
    best = torch.full((len(q), 0), -torch.inf, device=dev)
    best_ids = torch.empty((len(q), 0), dtype=torch.int64, device=dev)
    for c0 in range(0, len(keys), chunk_size):
        chunk = torch.from_numpy(np.ascontiguousarray(keys[c0 : c0 + chunk_size])).to(dev).float()
        scores = q @ chunk.T
        if similarity == "l2":
            scores.mul_(2).sub_(chunk.square().sum(1))
        if best.shape[1] < k:
            top, top_ids = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        else:
            top, top_ids = _above(scores, best[:, -1:])
            if top.shape[1] == 0:
                continue
        best = torch.cat([best, top], dim=1)
        best_ids = torch.cat([best_ids, top_ids + c0], dim=1)
        if best.shape[1] > k:
            best, pick = torch.topk(best, k, dim=1)
            best_ids = torch.gather(best_ids, 1, pick)
    return best, best_ids


def _above(scores: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the scores above ``threshold`` [B, 1] and their columns, padded with −inf."""
    rows, cols = torch.nonzero(scores > threshold, as_tuple=True)
    if len(rows) == 0:
        return scores.new_empty((len(scores), 0)), rows.new_empty((len(scores), 0))
    counts = torch.bincount(rows, minlength=len(scores))
    slot = torch.arange(len(rows), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
    width = int(counts.max())
    top = torch.full((len(scores), width), -torch.inf, dtype=scores.dtype, device=scores.device)
    top_ids = torch.zeros((len(scores), width), dtype=torch.int64, device=scores.device)
    top[rows, slot] = scores[rows, cols]
    top_ids[rows, slot] = cols
    return top, top_ids


def _gather_rows(keys: np.ndarray, ids: np.ndarray) -> torch.Tensor:
    """Key rows of ``ids`` (−1 gives row 0; the caller masks it), in the keys' dtype, as a CPU tensor.

    Keys in memory are gathered with one ``index_select``; memory-mapped keys (too
    large for memory) are read once per distinct id, in file order, so that the
    page cache and read-ahead serve neighbouring ids.
    """
    safe = np.where(ids >= 0, ids, 0)
    if isinstance(keys, np.memmap):
        uniq, inverse = np.unique(safe, return_inverse=True)
        return torch.from_numpy(np.ascontiguousarray(keys[uniq]))[torch.from_numpy(inverse.reshape(-1))]
    return torch.from_numpy(keys).index_select(0, torch.from_numpy(safe))


def _by_index_kernel(keys: np.ndarray, dev: torch.device) -> bool:
    """Whether faiss's by-index kernels can score rows of ``keys`` in place: CPU, fp32, in memory."""
    return (
        dev.type == "cpu"
        and keys.dtype == np.float32
        and not isinstance(keys, np.memmap)
        and keys.flags.c_contiguous
    )


def _faiss_scores(q: np.ndarray, keys: np.ndarray, ids: np.ndarray, similarity: Similarity) -> np.ndarray:
    """Exact scores of ``ids`` [B, k] for queries ``q`` [B, D] by faiss's ``*_by_idx`` kernels; −inf for −1.

    They read each key row where it lies (L2 from the differences), so no [B·k, D] copy of the
    gathered rows is made: five times faster than gathering and reducing with torch.
    """
    import faiss

    q = np.ascontiguousarray(q, dtype=np.float32)
    safe = np.ascontiguousarray(np.where(ids >= 0, ids, 0), dtype=np.int64)
    out = np.empty(safe.shape, dtype=np.float32)
    kernel = faiss.fvec_L2sqr_by_idx if similarity == "l2" else faiss.fvec_inner_products_by_idx
    ptr = faiss.swig_ptr
    kernel(ptr(out), ptr(q), ptr(keys), ptr(safe), keys.shape[1], len(q), safe.shape[1])
    if similarity == "l2":
        np.negative(out, out=out)
    out[ids < 0] = -np.inf
    return out


def _scores_of(
    q: np.ndarray, keys: np.ndarray, ids: np.ndarray, similarity: Similarity, dev: torch.device,
    max_elements: int = _RESCORE_ELEMENTS,
) -> np.ndarray:
    """Exact scores (float32) of ``ids`` [B, k] for queries ``q`` [B, D]; −inf where an id is −1.

    fp32 keys in memory on the CPU are read in place by faiss's by-index kernels; otherwise
    rows are gathered with torch a few queries at a time, so that a [rows·k, D] block of at
    most ``max_elements`` values stays small.
    """
    if _by_index_kernel(keys, dev):
        return _faiss_scores(q, keys, ids, similarity)
    out = np.empty(ids.shape, dtype=np.float32)
    step = max(1, max_elements // max(1, ids.shape[1] * keys.shape[1]))
    for r in range(0, len(q), step):
        q_t = torch.as_tensor(np.ascontiguousarray(q[r : r + step]), dtype=torch.float32).to(dev)
        ids_t = torch.from_numpy(np.ascontiguousarray(ids[r : r + step], dtype=np.int64))
        out[r : r + len(q_t)] = _exact_scores(q_t, keys, ids_t, similarity, dev).cpu().numpy()
    return out


def _exact_scores(
    q: torch.Tensor, keys: np.ndarray, ids: torch.Tensor, similarity: Similarity, dev: torch.device
) -> torch.Tensor:
    """Scores of ``ids`` [B, k] for queries ``q`` [B, D]; −inf where an id is −1.

    L2 is ``−‖q−k‖²`` from the differences (no cancellation of a norm expansion),
    computed by ``cdist``'s direct kernel, which reads the gathered [B, k, D] block once.
    """
    flat = ids.reshape(-1).cpu().numpy()
    rows = _gather_rows(keys, flat).to(dev, non_blocking=True)
    block = rows.view(ids.shape[0], ids.shape[1], -1).float()
    if similarity == "ip":
        scores = torch.bmm(block, q[:, :, None]).squeeze(-1)
    else:
        dist = torch.cdist(q[:, None, :], block, compute_mode="donot_use_mm_for_euclid_dist")[:, 0]
        scores = dist.square_().neg_()
    scores[torch.from_numpy(flat < 0).to(dev).view(ids.shape)] = -torch.inf
    return scores


def rescore(
    queries: np.ndarray,
    ids: np.ndarray,
    datastore: Any,
    similarity: Similarity = "ip",
    device: str | torch.device = "auto",
    max_elements: int = 1 << 22,
) -> np.ndarray:
    """Exact scores (float32 [Q, k]) of neighbour ``ids`` [Q, k] from the stored keys.

    This is the "real score" of FAISS neighbours. Ids of −1 (missing
    neighbours) get −inf. Queries are processed in batches of at most
    ``max_elements`` gathered key values (16 MiB of fp32 by default: the block
    stays in the CPU cache while it is converted and reduced). fp32 keys held in
    memory (see :meth:`Datastore.load_keys_if_they_fit`) are read in place by faiss's
    by-index kernels; memory-mapped ones are read in sorted, de-duplicated blocks.
    """
    similarity = check_similarity(similarity)
    keys = _keys_of(datastore)
    n, dim = keys.shape
    queries = _queries(queries, dim)
    ids = np.asarray(ids)
    if ids.ndim != 2 or len(ids) != len(queries):
        raise KnnlmError(f"ids must be [Q, k] with Q={len(queries)}; got {list(ids.shape)}")
    if ids.size and (ids.max() >= n or ids.min() < -1):
        raise KnnlmError(f"neighbour ids must be in [-1, {n}); the index does not belong to this datastore")
    dev = resolve_device(device)
    out = np.empty(ids.shape, dtype=np.float32)
    for q0 in range(0, len(queries), 1 << 16):
        rows = slice(q0, q0 + (1 << 16))
        out[rows] = _scores_of(np.asarray(queries[rows]), keys, np.asarray(ids[rows]), similarity, dev, max_elements)
    return out
