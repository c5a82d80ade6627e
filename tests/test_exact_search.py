"""Exact top-k and re-scoring equal a float64 NumPy brute force, in the project's score convention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knnlm.datastore import Datastore, exact_topk, rescore, write_datastore
from knnlm.errors import KnnlmError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Datastore:
    rng = np.random.default_rng(0)
    keys = (rng.standard_normal((3000, 24)) * 3 + 20).astype(np.float16)  # large norms: L2 cancellation
    vals = rng.integers(0, 500, 3000)
    return write_datastore(
        tmp_path_factory.mktemp("exact") / "ds", keys, vals, key_type="ffn", source={"synthetic": "gaussian, seed 0"}
    )


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return (np.random.default_rng(1).standard_normal((37, 24)) * 3 + 20).astype(np.float32)


def brute_force(queries: np.ndarray, keys: np.ndarray, similarity: str) -> np.ndarray:
    q, k = queries.astype(np.float64), np.asarray(keys, dtype=np.float64)
    if similarity == "ip":
        return q @ k.T
    return -((q[:, None, :] - k[None, :, :]) ** 2).sum(-1)


@pytest.mark.parametrize("similarity", ["ip", "l2"])
@pytest.mark.parametrize("k,chunk_size,query_batch", [(1, 1000, 8), (10, 333, 64), (700, 256, 12), (3000, 4096, 37)])
def test_exact_topk_equals_float64_brute_force(store, queries, similarity, k, chunk_size, query_batch):
    scores, ids = exact_topk(
        queries, store, k, similarity, device="cpu", chunk_size=chunk_size, query_batch=query_batch
    )
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and scores.shape == ids.shape == (37, k)
    ref = brute_force(queries, store.keys, similarity)
    best = -np.sort(-ref, axis=1)[:, :k]
    tol = 1e-5 * np.abs(ref).max()
    np.testing.assert_allclose(scores, best, rtol=0, atol=tol)  # the k best scores, best first
    np.testing.assert_allclose(np.take_along_axis(ref, ids, 1), scores, rtol=0, atol=tol)  # ids carry them
    assert all(len(set(row)) == k for row in ids.tolist())
    exact_order = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    assert (ids == exact_order).mean() > 0.99  # identical up to float ties
    if similarity == "l2":
        assert (scores <= 0).all()


@pytest.mark.parametrize("similarity", ["ip", "l2"])
def test_rescore_equals_float64_and_marks_missing(store, queries, similarity):
    rng = np.random.default_rng(2)
    ids = rng.integers(0, store.num_keys, (37, 50))
    ids[3, 7] = ids[0, 0] = -1
    scores = rescore(queries, ids, store, similarity, device="cpu", max_elements=5000)
    ref = np.take_along_axis(brute_force(queries, store.keys, similarity), np.maximum(ids, 0), 1)
    ok = ids >= 0
    np.testing.assert_allclose(scores[ok], ref[ok], rtol=1e-6, atol=1e-3)
    assert np.isneginf(scores[~ok]).all()


@pytest.mark.parametrize("similarity", ["ip", "l2"])
def test_rescore_routes_agree(store, queries, similarity):
    """fp32 keys in memory (faiss's by-index kernels) and memory-mapped fp16 keys (torch gather) score alike."""
    ids = np.random.default_rng(3).integers(-1, store.num_keys, (37, 64))
    in_memory = rescore(queries, ids, np.asarray(store.keys, dtype=np.float32), similarity, device="cpu")
    mapped = Datastore.open(store.path).keys
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.float16
    np.testing.assert_allclose(in_memory, rescore(queries, ids, mapped, similarity, device="cpu"), rtol=1e-6, atol=1e-3)
    assert np.isneginf(in_memory[ids < 0]).all()


def test_exact_topk_accepts_a_bare_key_array(store, queries):
    a = exact_topk(queries, np.asarray(store.keys), 5, "ip", device="cpu")
    b = exact_topk(queries, store, 5, "ip", device="cpu")
    np.testing.assert_array_equal(a[1], b[1])


def test_bad_arguments_are_knnlm_errors(store, queries):
    with pytest.raises(KnnlmError, match="k must be in"):
        exact_topk(queries, store, store.num_keys + 1)
    with pytest.raises(KnnlmError, match="queries must be"):
        exact_topk(queries[:, :10], store, 5)
    with pytest.raises(KnnlmError, match="unknown similarity"):
        exact_topk(queries, store, 5, "cosine")  # type: ignore[arg-type]
    with pytest.raises(KnnlmError, match="does not belong"):
        rescore(queries, np.full((37, 2), store.num_keys), store)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch matmul top-k on GPU)")
@pytest.mark.parametrize("similarity", ["ip", "l2"])
def test_gpu_exact_topk_equals_cpu(store, queries, similarity):
    cpu = exact_topk(queries, store, 64, similarity, device="cpu")
    gpu = exact_topk(queries, store, 64, similarity, device="cuda")
    np.testing.assert_allclose(gpu[0], cpu[0], rtol=1e-4, atol=1e-2)
    assert (gpu[1] == cpu[1]).mean() > 0.99
