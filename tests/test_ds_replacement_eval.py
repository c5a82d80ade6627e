"""Components in caches: replacement heads, top-k LMs and second LMs scored like kNN retrievals."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

import knnlm
from knnlm.errors import KnnlmError
from knnlm.evaluation.cache import Cache
from knnlm.evaluation.component_score import score_component
from knnlm.evaluation.components import lm_component, read_component, topk_component, write_component
from knnlm.evaluation.dump import LMDumpConfig, dump_lm

from .conftest import run_module, train_tiny

TPS, CW = 48, 16
KNNLM_DIR = str(knnlm.__path__[0])


def _dump(checkpoint, data, out, split):
    return dump_lm(
        LMDumpConfig(
            checkpoint=str(checkpoint), data=str(data), out=str(out), split=split,
            tokens_per_sample=TPS, context_window=CW, max_tokens=256, device="cpu",
        )
    )


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tiny_data_bin, tmp_path_factory):
    root = tmp_path_factory.mktemp("components")
    caches = {split: _dump(tiny_checkpoint, tiny_data_bin, root / split, split) for split in ("valid", "test")}
    second = train_tiny(tiny_data_bin, root / "seed2", ["--seed", "2"])
    other = {split: _dump(second, tiny_data_bin, root / f"{split}-seed2", split) for split in ("valid", "test")}
    head = root / "head"
    run_module(
        "fairseq_cli.train",
        [
            str(tiny_data_bin), "--user-dir", KNNLM_DIR, "--task", "language_modeling",
            "--arch", "knnlm_ds_replacement", "--base-checkpoint", str(tiny_checkpoint),
            "--ds-key", "ffn", "--ds-n", "1", "--ds-init-noise", "0", "--criterion", "ds_replacement",
            "--tokens-per-sample", "64", "--max-tokens", "512", "--optimizer", "adam", "--lr", "1e-12",
            "--max-update", "1", "--save-dir", str(head), "--no-epoch-checkpoints", "--no-progress-bar",
            "--seed", "1", "--cpu", "--num-workers", "0", "--no-save-optimizer-state", "--disable-validation",
        ],
    )
    return root, caches, other, head / "checkpoint_last.pt"


def test_n1_head_from_w_sm_reproduces_the_cached_base_lm(setup, tiny_data_bin):
    root, caches, _, head = setup
    for path in caches.values():
        run_module(
            "knnlm.cli.main",
            ["eval", "component", "--cache", str(path), "--name", "ffn-n1", "--checkpoint", str(head),
             "--data", str(tiny_data_bin)],
        )
        cache = Cache(path)
        comp, meta = read_component(cache, "ffn-n1")
        assert meta["knobs"]["kind"] == "learned" and meta["knobs"]["n"] == 1.0 and meta["knobs"]["key_type"] == "ffn"
        # the head reads fp16 cached queries; the base LM's log-probs came from fp32 features
        np.testing.assert_allclose(comp, np.asarray(cache.lm_logprob), atol=2e-2)


def test_topk_with_k_equal_v_is_the_lm_and_small_k_cuts_the_tail(setup, tiny_checkpoint, tiny_data_bin):
    _, caches, _, _ = setup
    cache = Cache(caches["valid"])
    full, knobs, _ = topk_component(cache, str(tiny_checkpoint), str(tiny_data_bin), cache.dict_size, 1.0)
    assert knobs == {"kind": "topk", "k": cache.dict_size, "temperature": 1.0}
    np.testing.assert_allclose(full, np.asarray(cache.lm_logprob), atol=2e-2)
    cut, _, _ = topk_component(cache, str(tiny_checkpoint), str(tiny_data_bin), 5, 1.0)
    finite = np.isfinite(cut)
    assert 0 < finite.sum() < len(cut)
    assert np.all(cut[finite] >= full[finite] - 1e-4), "renormalising over fewer words raises kept probabilities"


def test_second_lm_component_scores_like_a_retrieval(setup, tmp_path):
    _, caches, other, _ = setup
    valid, test = Cache(caches["valid"]), Cache(caches["test"])
    for cache, split in ((valid, "valid"), (test, "test")):
        logprob, knobs, source = lm_component(cache, Cache(other[split]))
        write_component(cache, "seed2", logprob, knobs, source)
    out = tmp_path / "results.jsonl"
    run_module(
        "knnlm.cli.main",
        ["score", "--valid-cache", str(caches["valid"]), "--test-cache", str(caches["test"]),
         "--component", "seed2", "--label", "table=ensemble", "--out", str(out)],
    )
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["schema"] == "knnlm.component/1" and line["knobs"]["kind"] == "lm"
    m = line["metrics"]
    lm2 = np.asarray(Cache(other["test"]).lm_logprob, dtype=np.float64)
    assert m["component_ppl"] == pytest.approx(math.exp(-lm2.mean()), rel=1e-6)
    # brute force: λ tuned on valid over the grid, applied to test
    lv, cv = np.asarray(valid.lm_logprob, np.float64), np.asarray(Cache(other["valid"]).lm_logprob, np.float64)
    grid = np.round(np.arange(0, 101) / 100, 10)
    nll = [-np.mean(np.log((1 - g) * np.exp(lv) + g * np.exp(cv))) for g in grid]
    best = grid[int(np.argmin(nll))]
    assert m["lambda_used"] == pytest.approx(best)
    lt = np.asarray(test.lm_logprob, np.float64)
    expected = math.exp(-np.mean(np.log((1 - best) * np.exp(lt) + best * np.exp(lm2))))
    assert m["interp_ppl"] == pytest.approx(expected, rel=1e-6)
    assert m["oracle_ppl"] <= min(m["lm_ppl"], m["component_ppl"])
    again = score_component(valid, test, "seed2", labels={"table": "ensemble"})
    assert again["knobs"] == line["knobs"] and again["metrics"] == line["metrics"]


def test_components_refuse_mismatches(setup, tiny_checkpoint, tiny_data_bin, tmp_path):
    root, caches, other, head = setup
    valid, test = Cache(caches["valid"]), Cache(caches["test"])
    with pytest.raises(KnnlmError, match="other tokens"):
        lm_component(valid, Cache(other["test"]))
    with pytest.raises(KnnlmError, match="not the base LM"):
        topk_component(Cache(other["valid"]), str(tiny_checkpoint), str(tiny_data_bin), 5, 1.0)
    with pytest.raises(KnnlmError, match="no component"):
        read_component(valid, "absent")
    with pytest.raises(KnnlmError, match="<= 0"):
        write_component(valid, "bad", np.full(valid.n_tokens, 0.5), {"kind": "lm"}, {})
    assert not (valid.path / "components" / "bad" / "meta.json").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "knnlm.cli.main", "eval", "component", "--cache", str(other["valid"]), "--name", "x",
         "--checkpoint", str(head), "--data", str(tiny_data_bin)],
        capture_output=True, text=True,
    )
    assert bad.returncode != 0 and "dumped from another checkpoint" in bad.stderr
    with pytest.raises(KnnlmError, match="test-cache"):
        score_component(valid, None, "seed2", split="test")
    with pytest.raises(KnnlmError, match="same folder"):
        score_component(valid, valid, "seed2")
    del test


@pytest.fixture(scope="module")
def stores(tiny_checkpoint, tiny_data_bin, tmp_path_factory):
    from knnlm.datastore import DatastoreBuildConfig, build_datastore

    root = tmp_path_factory.mktemp("stores")
    paths = build_datastore(
        DatastoreBuildConfig(
            checkpoint=str(tiny_checkpoint), data=str(tiny_data_bin), out=str(root), key_types=["att", "ffn"],
            tokens_per_sample=TPS, context_window=CW, max_tokens=256, device="cpu",
        )
    )
    return {p.name: p for p in paths}


def test_replace_sizes_by_frequency_and_loss(stores, tiny_checkpoint, tiny_data_bin, tmp_path):
    from knnlm.cli.replace import training_nll
    from knnlm.datastore import Datastore

    store = Datastore.open(stores["ffn"])
    vocab = len(open(tiny_data_bin / "dict.txt").readlines()) + 4  # fairseq's four special symbols
    for by in ("frequency", "loss"):
        out = tmp_path / f"{by}.npy"
        run_module(
            "knnlm.cli.main",
            ["replace", "sizes", "--datastore", str(stores["ffn"]), "--by", by, "--n", "3", "--data",
             str(tiny_data_bin), "--checkpoint", str(tiny_checkpoint), "--out", str(out)],
        )
        sizes = np.load(out)
        info = json.loads(out.with_suffix(".json").read_text())
        assert sizes.shape == (vocab,) and sizes.sum() == 3 * vocab and sizes.min() >= 1
        assert info["by"] == by and info["rows"] == 3 * vocab
        counts = np.bincount(np.asarray(store.vals), minlength=vocab)
        if by == "frequency":
            top = int(np.argmax(counts))
            assert sizes[top] == sizes.max() and (sizes[counts <= 1] == 1).all()
    # the loss is the base LM's NLL: its mean over the datastore is the training-split CE from the same contexts
    nll = training_nll(store, str(tiny_checkpoint), str(tiny_data_bin), batch=100)
    assert nll.shape == (store.num_keys,) and np.all(nll > 0)
    with pytest.raises(KnnlmError, match="ffn datastore"):
        training_nll(Datastore.open(stores["att"]), str(tiny_checkpoint), str(tiny_data_bin), batch=100)


def test_clusters_component_from_a_kmeans_of_the_datastore(stores, setup, tiny_data_bin, tmp_path):
    from knnlm.datastore import Datastore
    from knnlm.softmax_alternatives.clusters import load_clusters

    _, caches, _, _ = setup
    out = tmp_path / "clusters"
    run_module(
        "knnlm.cli.main",
        ["replace", "clusters", "--datastore", str(stores["att"]), "--clusters", "20", "--data", str(tiny_data_bin),
         "--train-size", "2000", "--niter", "5", "--out", str(out)],
    )
    store = Datastore.open(stores["att"])
    cache = Cache(caches["valid"])
    centroids, m, meta = load_clusters(out, cache.dict_size)
    assert 1 <= len(centroids) <= 20 and meta["key_type"] == "att"
    dense = m.to_dense().numpy()
    np.testing.assert_allclose(dense.sum(1), 1.0, rtol=1e-5)
    # brute force: every entry goes to its nearest centroid; M is the per-cluster word histogram
    keys = np.asarray(store.keys, dtype=np.float32)
    nearest = ((keys[:, None, :] - centroids.numpy()[None]) ** 2).sum(-1).argmin(1)
    hist = np.zeros_like(dense)
    np.add.at(hist, (nearest, np.asarray(store.vals)), 1.0)
    np.testing.assert_allclose(dense, hist / hist.sum(1, keepdims=True), atol=1e-6)
    run_module(
        "knnlm.cli.main", ["eval", "component", "--cache", str(caches["valid"]), "--name", "clusters", "--clusters",
                           str(out)],
    )
    comp, meta = read_component(cache, "clusters")
    assert meta["knobs"]["kind"] == "clusters" and np.all(comp <= 0)
