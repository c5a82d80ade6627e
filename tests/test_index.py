"""FAISS indexes: built over a datastore, bound to it, searched in the project's score convention."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from knnlm.datastore import (
    Datastore,
    IndexBuildConfig,
    KnnIndex,
    auto_factory,
    build_index,
    exact_topk,
    write_datastore,
)
from knnlm.datastore.index import index_info, sidecar_path, trained_path
from knnlm.errors import KnnlmError


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny indexes: threads only spin on a shared 2-core box."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


FACTORY = "IVF64,PQ8x4"  # 4-bit codes: trains in a second on this CPU-only faiss build


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((50, d)) * 4
    return (centers[rng.integers(0, 50, n)] + rng.standard_normal((n, d))).astype(np.float16)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Datastore:
    keys = clustered(12000, 32, 0)
    return write_datastore(
        tmp_path_factory.mktemp("idx") / "ds",
        keys,
        np.arange(12000) % 97,
        key_type="ffn",
        source={"synthetic": "50 gaussian clusters, seed 0"},
    )


@pytest.fixture(scope="module")
def other_store(tmp_path_factory) -> Datastore:
    keys = clustered(12000, 32, 1)
    return write_datastore(
        tmp_path_factory.mktemp("idx") / "other",
        keys,
        np.zeros(12000),
        key_type="ffn",
        source={"synthetic": "50 gaussian clusters, seed 1"},
    )


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return clustered(40, 32, 7).astype(np.float32)


@pytest.fixture(scope="module")
def ivf(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("ivf") / "ffn.IVF64_PQ8x4.l2.faiss"
    build_index(
        IndexBuildConfig(
            datastore=str(store.path),
            out=str(out),
            factory=FACTORY,
            metric="l2",
            nprobe=8,
            add_chunk=5000,
            device="cpu",
        )
    )
    return out


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_index_equals_exact_search(store, queries, metric, tmp_path):
    out = build_index(
        IndexBuildConfig(
            datastore=str(store.path), out=str(tmp_path / "flat.faiss"), factory="Flat", metric=metric, device="cpu"
        )
    )
    index = KnnIndex.load(out, store)
    assert index.nprobe is None and index.similarity == metric
    scores, ids = index.search(queries, 16)
    exact_scores, exact_ids = exact_topk(queries, store, 16, metric, device="cpu")
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-4, atol=1e-3)  # L2: -(squared distance)
    assert (ids == exact_ids).mean() > 0.99
    if metric == "l2":
        assert (scores <= 0).all()
    assert not trained_path(out).exists()  # Flat needs no training


def test_auto_factory_rules(tmp_path):
    assert auto_factory(5000, 64, 5000) == "Flat"
    assert auto_factory(12000, 32, 12000) == "IVF64,PQ8"
    assert auto_factory(103_000_000, 1024, 1_000_000) == "IVF8192,PQ64"
    small = write_datastore(
        tmp_path / "small", clustered(3000, 32, 3), np.zeros(3000), key_type="att", source={"synthetic": "small"}
    )
    out = build_index(
        IndexBuildConfig(datastore=str(small.path), out=str(tmp_path / "a.faiss"), factory="auto", device="cpu")
    )
    assert index_info(out)["factory"] == "Flat" and index_info(out)["factory_requested"] == "auto"


def test_ivf_pq_builds_stores_nprobe_and_recalls(store, queries, ivf):
    meta = index_info(ivf)
    assert meta["factory"] == FACTORY and meta["factory_requested"] == FACTORY
    assert meta["nprobe"] == 8 and meta["ntotal"] == store.num_keys and meta["datastore_id"] == store.datastore_id
    index = KnnIndex.load(ivf, store)
    assert index.nprobe == 8 and faiss.extract_index_ivf(index.index).nprobe == 8
    index.nprobe = 64
    assert faiss.extract_index_ivf(index.index).nprobe == 64
    assert KnnIndex.load(ivf, store, nprobe=3).nprobe == 3
    scores, ids = index.search(queries, 100)
    _, exact_ids = exact_topk(queries, store, 10, "l2", device="cpu")
    # 10-recall@100: the exact 10 nearest among the 100 the compressed index returns
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), exact_ids.tolist(), strict=True)])
    assert recall > 0.6
    assert (scores <= 0).all() and np.all(np.diff(scores, axis=1) <= 1e-4)


def test_missing_neighbours_have_id_minus_one_and_score_minus_inf(store, queries, ivf):
    index = KnnIndex.load(ivf, store, nprobe=1)
    scores, ids = index.search(queries, 2000)  # more than one list holds
    assert (ids == -1).any()
    assert np.isneginf(scores[ids == -1]).all() and np.isfinite(scores[ids >= 0]).all()


def test_index_is_refused_against_another_datastore(other_store, ivf):
    with pytest.raises(KnnlmError, match="was built from datastore .* Build an index for this datastore"):
        KnnIndex.load(ivf, other_store)


def test_too_large_nlist_names_the_largest_valid_choice(store, tmp_path):
    out = tmp_path / "big.faiss"
    with pytest.raises(
        KnnlmError,
        match=r"IVF4096 needs 159744 training keys .* largest valid nlist is 307 "
        r"\(largest power of two: 256\), e.g. --factory IVF256,PQ8",
    ):
        build_index(IndexBuildConfig(datastore=str(store.path), out=str(out), factory="IVF4096,PQ8", device="cpu"))
    with pytest.raises(KnnlmError, match="raise --train-size.*largest valid nlist is 51"):
        build_index(
            IndexBuildConfig(
                datastore=str(store.path), out=str(out), factory="IVF64,Flat", train_size=2000, device="cpu"
            )
        )
    with pytest.raises(KnnlmError, match="PQ7 needs m to divide the key dimension 32"):
        build_index(IndexBuildConfig(datastore=str(store.path), out=str(out), factory="IVF16,PQ7", device="cpu"))
    assert not out.exists()


def test_half_written_or_changed_index_is_refused(store, ivf, tmp_path):
    copy = tmp_path / "copy.faiss"
    copy.write_bytes(ivf.read_bytes())
    with pytest.raises(KnnlmError, match="meta.json is missing: .* half-written"):
        KnnIndex.load(copy, store)
    (tmp_path / "copy.faiss.meta.json").write_bytes((ivf.parent / f"{ivf.name}.meta.json").read_bytes())
    KnnIndex.load(copy, store)
    with open(copy, "ab") as f:
        f.write(b"\0")
    with pytest.raises(KnnlmError, match="changed after it was built"):
        KnnIndex.load(copy, store)


def test_existing_index_with_other_settings_is_not_overwritten(store, ivf):
    before = ivf.read_bytes()
    same = IndexBuildConfig(
        datastore=str(store.path), out=str(ivf), factory=FACTORY, metric="l2", nprobe=8, device="cpu"
    )
    assert build_index(same) == ivf  # complete already: kept as is
    with pytest.raises(KnnlmError, match="not built with these settings .* --overwrite"):
        build_index(IndexBuildConfig(datastore=str(store.path), out=str(ivf), factory="Flat", device="cpu"))
    assert ivf.read_bytes() == before


def test_trained_index_is_reused_when_adding_restarts(store, ivf, tmp_path, caplog):
    cached = trained_path(ivf)
    assert cached.exists() and index_info(cached)["role"] == "trained"
    out = tmp_path / ivf.name
    (tmp_path / cached.name).write_bytes(cached.read_bytes())
    (tmp_path / f"{cached.name}.meta.json").write_bytes(cached.with_name(f"{cached.name}.meta.json").read_bytes())
    with caplog.at_level("INFO", logger="knnlm.datastore.index"):
        build_index(
            IndexBuildConfig(
                datastore=str(store.path), out=str(out), factory=FACTORY, metric="l2", nprobe=8, device="cpu"
            )
        )
    assert "reusing the trained index" in caplog.text
    assert out.read_bytes() == ivf.read_bytes()


def test_cli_build_and_info(store, tmp_path, capsys):
    import argparse
    import json

    from knnlm.cli import index as index_cli

    parser = argparse.ArgumentParser()
    index_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "index",
            "build",
            "--datastore",
            str(store.path),
            "--out",
            str(tmp_path / "x.faiss"),
            "--factory",
            "IVF32,Flat",
            "--metric",
            "ip",
            "--nprobe",
            "4",
            "--device",
            "cpu",
        ]
    )
    args.func(args)
    assert "IVF32,Flat (ip), ntotal 12000, nprobe 4" in capsys.readouterr().out
    args = parser.parse_args(["index", "info", str(tmp_path / "x.faiss")])
    args.func(args)
    assert json.loads(capsys.readouterr().out)["datastore_id"] == store.datastore_id


@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="needs faiss GPU support and a GPU (faiss-gpu)")
def test_gpu_built_index_matches_cpu_search(store, queries, tmp_path):
    out = build_index(
        IndexBuildConfig(
            datastore=str(store.path), out=str(tmp_path / "g.faiss"), factory="Flat", metric="ip", device="cuda"
        )
    )
    cpu = KnnIndex.load(out, store).search(queries, 8)
    gpu = KnnIndex.load(out, store, device="cuda").search(queries, 8)
    np.testing.assert_allclose(gpu[0], cpu[0], rtol=1e-2, atol=1e-2)


def test_index_content_is_verified_against_its_sidecar(store, other_store, ivf, tmp_path):
    """Flipped bytes, or another index of the same size under this sidecar, are refused; the hash is the file's."""
    meta = index_info(ivf)
    assert meta["index_sha256"] == hashlib.sha256(Path(ivf).read_bytes()).hexdigest()
    flipped = tmp_path / "flipped.faiss"
    data = bytearray(Path(ivf).read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    shutil.copyfile(sidecar_path(ivf), sidecar_path(flipped))
    with pytest.raises(KnnlmError, match="sha256 differs"):
        KnnIndex.load(flipped, store)
    with pytest.raises(KnnlmError, match="sha256 differs"):
        index_info(flipped)
    # an index of another datastore, same factory and size, given this index's sidecar
    other = tmp_path / "other.faiss"
    build_index(IndexBuildConfig(datastore=str(other_store.path), out=str(other), factory=FACTORY, metric="l2",
                                 nprobe=8, add_chunk=5000, device="cpu"))
    assert other.stat().st_size == Path(ivf).stat().st_size
    shutil.copyfile(sidecar_path(ivf), sidecar_path(other))
    with pytest.raises(KnnlmError, match="sha256 differs"):
        KnnIndex.load(other, store)
    assert KnnIndex.load(other, store, verify=False).ntotal == store.num_keys  # --verify off: size checks only


def test_a_memory_mapped_index_searches_like_a_loaded_one(store, ivf, queries):
    loaded = KnnIndex.load(ivf, store).search(queries, 16)
    mapped = KnnIndex.load(ivf, store, mmap=True).search(queries, 16)
    np.testing.assert_array_equal(loaded[1], mapped[1])
    np.testing.assert_array_equal(loaded[0], mapped[0])
