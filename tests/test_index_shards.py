"""Scale-out: shard datastores -> merged datastore; shard indexes served by IndexShards or merged on disk."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from knnlm.datastore import (
    Datastore,
    DatastoreBuildConfig,
    IndexBuildConfig,
    KnnIndex,
    build_datastore,
    build_index,
    merge_datastores,
    merge_index_ondisk,
    open_index_shards,
)
from knnlm.datastore.index import index_info
from knnlm.errors import KnnlmError

FACTORY = "IVF16,PQ8x4"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny model and indexes: threads only spin on a shared 2-core box."""
    threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(threads[0])
    faiss.omp_set_num_threads(threads[1])


@pytest.fixture(scope="module")
def sharded(tiny_checkpoint, tiny_data_bin, tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    shards = []
    for i in range(2):
        build_datastore(
            DatastoreBuildConfig(
                checkpoint=str(tiny_checkpoint),
                data=str(tiny_data_bin),
                out=str(root / f"shard{i}"),
                key_types=["ffn"],
                tokens_per_sample=64,
                context_window=32,
                max_tokens=512,
                device="cpu",
                num_shards=2,
                shard_id=i,
            )
        )
        shards.append(Datastore.open(root / f"shard{i}" / "ffn"))
    merged = Datastore.open(merge_datastores([s.path for s in shards], root / "merged"))
    trained = root / "trained.faiss"
    build_index(
        IndexBuildConfig(
            datastore=str(merged.path),
            out=str(trained),
            factory=FACTORY,
            metric="ip",
            nprobe=4,
            device="cpu",
            train_only=True,
        )
    )
    shard_indexes = []
    for i, s in enumerate(shards):
        out = root / f"shard{i}.faiss"
        build_index(
            IndexBuildConfig(
                datastore=str(s.path), out=str(out), trained=str(trained), metric="ip", nprobe=4, device="cpu"
            )
        )
        shard_indexes.append(out)
    whole = root / "whole.faiss"
    build_index(
        IndexBuildConfig(
            datastore=str(merged.path), out=str(whole), trained=str(trained), metric="ip", nprobe=4, device="cpu"
        )
    )
    return root, shards, merged, trained, shard_indexes, whole


def assert_same_neighbours(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> None:
    """Equal scores, and equal ids above each row's k-th score (4-bit PQ codes tie a lot)."""
    np.testing.assert_allclose(b[0], a[0], rtol=1e-5, atol=1e-4)
    for sa, ia, sb, ib in zip(*a, *b, strict=True):
        cut = sa[-1] + 1e-4
        assert set(ia[sa > cut].tolist()) == set(ib[sb > cut].tolist())


@pytest.fixture(scope="module")
def queries(sharded) -> np.ndarray:
    merged = sharded[2]
    rows = np.random.default_rng(0).choice(merged.num_keys, 30, replace=False)
    return merged.keys[rows].astype(np.float32) + 0.01


def test_trained_index_is_empty_and_shards_record_it(sharded):
    _, shards, merged, trained, shard_indexes, _ = sharded
    meta = index_info(trained)
    assert meta["role"] == "trained" and meta["ntotal"] == 0 and meta["factory"] == FACTORY
    for s, path in zip(shards, shard_indexes, strict=True):
        assert index_info(path)["trained_id"] == meta["trained_id"]
        assert index_info(path)["datastore_id"] == s.datastore_id
    assert sum(s.num_keys for s in shards) == merged.num_keys
    assert [m["datastore_id"] for m in merged.meta["merged_from"]] == [s.datastore_id for s in shards]
    # IVF shard indexes store merged-datastore rows; loaded alone they still answer in their shard's rows
    assert [index_info(p)["id_offset"] for p in shard_indexes] == [0, shards[0].num_keys]
    alone = KnnIndex.load(shard_indexes[1], shards[1], nprobe=16)
    ids = alone.search(shards[1].keys[:5].astype(np.float32), 1)[1]
    assert (ids[:, 0] >= 0).all() and ids.max() < shards[1].num_keys


def test_index_shards_search_equals_the_single_index(sharded, queries):
    _, _, merged, _, shard_indexes, whole = sharded
    single = KnnIndex.load(whole, merged, nprobe=8)
    served = open_index_shards(shard_indexes, merged, nprobe=8)
    assert served.ntotal == merged.num_keys and served.nprobe == 8
    a, b = single.search(queries, 20), served.search(queries, 20)
    assert_same_neighbours(a, b)
    assert np.all(merged.vals[b[1][b[1] >= 0]] >= 0)


def test_shards_in_the_wrong_order_are_refused(sharded):
    _, _, merged, _, shard_indexes, _ = sharded
    with pytest.raises(KnnlmError, match="was built from datastore"):
        open_index_shards(list(reversed(shard_indexes)), merged)
    with pytest.raises(KnnlmError, match="not a merge of shard datastores"):
        open_index_shards(shard_indexes, sharded[1][0])


def test_ondisk_merge_equals_the_single_index(sharded, queries):
    root, _, merged, trained, shard_indexes, whole = sharded
    out = merge_index_ondisk(trained, shard_indexes, merged, root / "ondisk.faiss")
    assert (root / "ondisk.ivfdata").exists() and index_info(out)["ondisk"]["ivfdata"].endswith("ondisk.ivfdata")
    ondisk = KnnIndex.load(out, merged, nprobe=8)
    single = KnnIndex.load(whole, merged, nprobe=8)
    assert_same_neighbours(single.search(queries, 20), ondisk.search(queries, 20))
    with pytest.raises(KnnlmError, match="exists"):
        merge_index_ondisk(trained, shard_indexes, merged, out)


def test_ondisk_merge_refuses_shards_of_another_training(sharded, tmp_path):
    root, shards, merged, _, shard_indexes, _ = sharded
    other = tmp_path / "other.trained.faiss"
    build_index(
        IndexBuildConfig(
            datastore=str(merged.path),
            out=str(other),
            factory=FACTORY,
            metric="ip",
            train_size=5000,  # another sample: another quantizer
            seed=9,
            device="cpu",
            train_only=True,
        )
    )
    with pytest.raises(KnnlmError, match="not built from the trained index"):
        merge_index_ondisk(other, shard_indexes, merged, tmp_path / "x.faiss")


def test_flat_shards_are_numbered_successively(sharded, queries, tmp_path):
    _, shards, merged, _, _, _ = sharded
    paths = []
    for i, s in enumerate([*shards, merged]):
        out = tmp_path / f"flat{i}.faiss"
        build_index(IndexBuildConfig(datastore=str(s.path), out=str(out), factory="Flat", metric="l2", device="cpu"))
        paths.append(out)
    assert [index_info(p)["id_offset"] for p in paths] == [0, 0, 0]
    served = open_index_shards(paths[:2], merged)
    single = KnnIndex.load(paths[2], merged)
    assert_same_neighbours(single.search(queries, 20), served.search(queries, 20))
    local = KnnIndex.load(paths[1], shards[1]).search(queries, 5)[1]
    assert local.max() < shards[1].num_keys  # a shard index alone returns rows of its shard
