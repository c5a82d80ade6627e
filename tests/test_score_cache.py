"""The per-token cache: written by `write_cache`, verified and memory-mapped by `Cache`.

`make_cache` builds small but real caches for the score and report tests: a random
datastore of keys and values, queries, exact L2/IP top-k (the "real" retrievals)
and a noisy ranking standing in for FAISS (the "faiss" ones, with approximate or
exact scores).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from knnlm.errors import KnnlmError
from knnlm.evaluation.cache import (
    Cache,
    RetrievalArrays,
    RetrievalInfo,
    check_pair,
    default_retrieval_name,
    write_cache,
)

VOCAB = 50
DIM = 8
N_DATASTORE = 400
K_MAX = 32
FINGERPRINT = "sha256:tiny-model"


def _neighbours(q: np.ndarray, keys: np.ndarray, similarity: str) -> np.ndarray:
    """Exact scores of every datastore entry, higher is better."""
    if similarity == "ip":
        return q @ keys.T
    return -(((q[:, None, :] - keys[None, :, :]) ** 2).sum(-1))


def make_cache(
    path: Path,
    split: str,
    *,
    n_tokens: int = 120,
    seed: int = 0,
    datastore_seed: int = 7,
    fingerprint: str = FINGERPRINT,
    p_follow: float = 0.5,
    retrievals: tuple[tuple[str, str, str, str], ...] = (
        ("att", "l2", "faiss", "faiss"),
        ("att", "l2", "faiss", "real"),
        ("att", "l2", "real", "real"),
        ("att", "ip", "faiss", "faiss"),
        ("ffn", "l2", "faiss", "faiss"),
        ("ffn", "ip", "faiss", "faiss"),
    ),
) -> Path:
    """A cache of one split over a shared random datastore (same ``datastore_seed`` = same datastore)."""
    ds_rng = np.random.default_rng(datastore_seed)
    keys = {kt: ds_rng.standard_normal((N_DATASTORE, DIM)).astype(np.float32) for kt in ("att", "ffn")}
    ds_vals = ds_rng.integers(0, VOCAB, N_DATASTORE)
    rng = np.random.default_rng(seed)
    queries = {kt: rng.standard_normal((n_tokens, DIM)).astype(np.float32) for kt in ("att", "ffn")}
    # targets follow the nearest att neighbour with probability p_follow: the kNN part is informative
    nearest = np.argmax(_neighbours(queries["att"], keys["att"], "l2"), axis=1)
    targets = np.where(rng.random(n_tokens) < p_follow, ds_vals[nearest], rng.integers(0, VOCAB, n_tokens))
    logits = rng.standard_normal((n_tokens, VOCAB))
    log_softmax = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    lm_logprob = log_softmax[np.arange(n_tokens), targets]
    arrays = []
    for key_type, similarity, mask_source, score_source in retrievals:
        exact = _neighbours(queries[key_type], keys[key_type], similarity)
        if mask_source == "real":
            ranking = exact
        else:  # an approximate search: exact scores plus noise decide the ranking
            ranking = exact + np.random.default_rng(99).normal(0, 0.5, exact.shape)
        ids = np.argsort(-ranking, axis=1, kind="stable")[:, :K_MAX]
        source = exact if score_source == "real" else ranking
        scores = np.take_along_axis(source, ids, axis=1)
        info = RetrievalInfo(
            name=default_retrieval_name(key_type, similarity, mask_source, score_source),
            key_type=key_type,
            similarity=similarity,
            mask_source=mask_source,
            score_source=score_source,
            k_max=K_MAX,
            datastore={"path": f"datastores/tiny-{key_type}", "size": N_DATASTORE},
            index={"factory": "Flat", "nprobe": 1} if mask_source == "faiss" else None,
        )
        arrays.append(RetrievalArrays(info=info, ids=ids, scores=scores, vals=ds_vals[ids]))
    return write_cache(
        path,
        split=split,
        targets=targets,
        lm_logprob=lm_logprob,
        dict_size=VOCAB,
        checkpoint_fingerprint=fingerprint,
        key_dims={"att": DIM, "ffn": DIM},
        retrievals=arrays,
        query_att=queries["att"],
        query_ffn=queries["ffn"],
        positions=np.arange(n_tokens) % 16,
    )


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("caches")
    return make_cache(root / "valid", "valid", seed=1), make_cache(root / "test", "test", seed=2)


def test_roundtrip_memory_maps_and_finds_retrievals(caches):
    valid = Cache(caches[0])
    assert valid.split == "valid" and valid.n_tokens == 120 and valid.k_max == K_MAX
    assert isinstance(valid.targets, np.memmap) and valid.targets.dtype == np.int64
    assert valid.lm_logprob.dtype == np.float32
    r = valid.find("att", "l2", "faiss", "real")
    assert r.info.name == "att-l2-faiss-realscore" and r.scores.shape == (120, K_MAX)
    assert isinstance(r.vals, np.memmap) and r.vals.dtype == np.int64
    # ranked by the mask source: FAISS's (noisy) order is kept, so real scores are not sorted
    assert not np.all(np.diff(np.asarray(r.scores), axis=1) <= 0)
    real = valid.find("att", "l2", "real", "real")
    assert np.all(np.diff(np.asarray(real.scores), axis=1) <= 0)
    assert valid.has("ffn", "ip", "faiss", "faiss") and not valid.has("ffn", "ip", "real", "real")


def test_missing_retrieval_error_lists_what_exists(caches):
    with pytest.raises(KnnlmError, match=r"no retrieval with key type ffn.*it holds: att-l2-faiss"):
        Cache(caches[0]).find("ffn", "l2", "real", "real")


def test_half_written_cache_is_refused(tmp_path):
    path = make_cache(tmp_path / "c", "valid", n_tokens=10)
    (path / "meta.json").unlink()
    with pytest.raises(KnnlmError, match=r"meta.json is missing.*re-run the dump"):
        Cache(path)


def test_shape_and_dtype_mismatches_are_refused(tmp_path):
    path = make_cache(tmp_path / "c", "valid", n_tokens=10)
    np.save(path / "targets.npy", np.zeros(11, dtype=np.int64))
    with pytest.raises(KnnlmError, match=r"targets.npy has shape \(11,\)"):
        Cache(path)
    path = make_cache(tmp_path / "q", "valid", n_tokens=10)
    np.save(path / "query_att.npy", np.zeros((10, DIM + 1), dtype=np.float16))
    with pytest.raises(KnnlmError, match=r"query_att.npy has shape \(10, 9\)"):
        Cache(path)
    path = make_cache(tmp_path / "d", "valid", n_tokens=10)
    vals = path / "knn" / "att-l2-faiss" / "vals.npy"
    np.save(vals, np.load(vals).astype(np.int16))
    with pytest.raises(KnnlmError, match="int16 overflows"):
        Cache(path).retrieval("att-l2-faiss")


def test_out_of_vocabulary_targets_are_refused(tmp_path):
    path = make_cache(tmp_path / "c", "valid", n_tokens=10)
    meta = json.loads((path / "meta.json").read_text())
    meta["dict_size"] = 3
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(KnnlmError, match="outside"):
        Cache(path)


def test_pair_checks_refuse_tuning_on_test_and_other_models(tmp_path, caches):
    valid, test = Cache(caches[0]), Cache(caches[1])
    check_pair(valid, test)
    with pytest.raises(KnnlmError, match="never on test"):
        check_pair(test, valid)
    with pytest.raises(KnnlmError, match="same folder"):
        check_pair(valid, Cache(caches[0]))
    other = Cache(make_cache(tmp_path / "other", "test", n_tokens=10, fingerprint="sha256:other"))
    with pytest.raises(KnnlmError, match="checkpoint_fingerprint"):
        check_pair(valid, other)
