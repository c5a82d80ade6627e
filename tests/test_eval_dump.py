"""The dump phase: LM log-probs match fairseq-eval-lm, retrievals match brute force, scoring reads them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import knnlm
from knnlm.datastore import Datastore, DatastoreBuildConfig, IndexBuildConfig, build_datastore, build_index
from knnlm.errors import KnnlmError
from knnlm.evaluation.cache import Cache
from knnlm.evaluation.dump import LMDumpConfig, RetrievalConfig, cache_lm_perplexity, dump_lm, dump_retrieval
from knnlm.evaluation.score import ScoreSetting, score

from .conftest import run_module

TPS, CW = 48, 16


@pytest.fixture(scope="module")
def caches(tiny_checkpoint, tiny_data_bin, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    out = {}
    for split in ("valid", "test"):
        out[split] = dump_lm(
            LMDumpConfig(
                checkpoint=str(tiny_checkpoint), data=str(tiny_data_bin), out=str(root / split), split=split,
                tokens_per_sample=TPS, context_window=CW, max_tokens=256, chunk_batches=2, device="cpu",
            )
        )
    (store_path,) = build_datastore(
        DatastoreBuildConfig(
            checkpoint=str(tiny_checkpoint), data=str(tiny_data_bin), out=str(root / "ds"), key_types=["att"],
            tokens_per_sample=TPS, context_window=CW, max_tokens=256, device="cpu",
        )
    )
    index = build_index(
        IndexBuildConfig(datastore=str(store_path), out=str(root / "att.l2.flat"), factory="Flat", metric="l2",
                         device="cpu")
    )
    return out, store_path, index


def fairseq_eval_lm_ppl(checkpoint: Path, data: Path, split: str) -> float:
    proc = run_module(
        "fairseq_cli.eval_lm",
        [str(data), "--user-dir", str(Path(knnlm.__file__).parent), "--path", str(checkpoint),
         "--gen-subset", split, "--tokens-per-sample", str(TPS), "--context-window", str(CW),
         "--max-tokens", "256", "--cpu", "--num-workers", "0"],
    )
    return float(re.search(r"Perplexity: ([0-9.]+)", proc.stdout + proc.stderr).group(1))


def test_lm_perplexity_equals_fairseq_eval_lm(caches, tiny_checkpoint, tiny_data_bin):
    dumped, _, _ = caches
    ours = cache_lm_perplexity(dumped["valid"])
    theirs = fairseq_eval_lm_ppl(tiny_checkpoint, tiny_data_bin, "valid")
    assert ours == pytest.approx(theirs, rel=2e-4)  # fairseq prints 2 decimals


def test_cache_holds_every_target_once(caches, tiny_data_bin):
    dumped, _, _ = caches
    cache = Cache(dumped["valid"])
    from fairseq.data import Dictionary, data_utils

    dictionary = Dictionary.load(str(tiny_data_bin / "dict.txt"))
    dataset = data_utils.load_indexed_dataset(str(tiny_data_bin / "valid"), dictionary)
    stream = np.concatenate([dataset[i].numpy() for i in range(len(dataset))])
    np.testing.assert_array_equal(np.asarray(cache.targets), stream)
    positions = np.load(Path(dumped["valid"]) / "positions.npy")
    assert positions[0] == 0 and positions.max() == TPS - 1  # first window has no carried context


def test_retrievals_match_brute_force(caches):
    dumped, store_path, index = caches
    store = Datastore.open(store_path)
    k = 16
    dump_retrieval(RetrievalConfig(cache=str(dumped["valid"]), datastore=str(store_path), index=str(index),
                                   k_max=k, device="cpu"))
    dump_retrieval(RetrievalConfig(cache=str(dumped["valid"]), datastore=str(store_path), similarity="l2",
                                   k_max=k, device="cpu", batch=50))
    cache = Cache(dumped["valid"])
    rows = slice(0, 200)  # brute force on a few hundred queries keeps memory small
    queries = np.load(Path(dumped["valid"]) / "query_att.npy")[rows].astype(np.float64)
    keys = np.asarray(store.keys, dtype=np.float64)
    dist = (queries**2).sum(1)[:, None] - 2 * queries @ keys.T + (keys**2).sum(1)[None, :]
    want_scores = -np.sort(dist, axis=1)[:, :k]
    for mask in ("faiss", "real"):
        r = cache.find("att", "l2", mask, "faiss" if mask == "faiss" else "real")
        np.testing.assert_allclose(np.asarray(r.scores)[rows], want_scores, rtol=1e-3, atol=1e-2)
        ids = np.asarray(r.ids)[rows]
        np.testing.assert_allclose(-dist[np.arange(len(ids))[:, None], ids], want_scores, rtol=1e-3, atol=1e-2)
        np.testing.assert_array_equal(np.asarray(r.vals)[rows], np.asarray(store.vals)[ids])


def test_scoring_reads_the_dumped_caches(caches):
    dumped, store_path, index = caches
    for split in ("valid", "test"):
        dump_retrieval(RetrievalConfig(cache=str(dumped[split]), datastore=str(store_path), index=str(index),
                                       k_max=32, device="cpu", overwrite=True))
    line = score(Cache(dumped["valid"]), Cache(dumped["test"]),
                 ScoreSetting(key_type="att", similarity="l2", k=32, temperature=1.0, lam="tune"))
    metrics = line["metrics"]
    assert metrics["lm_ppl"] == pytest.approx(cache_lm_perplexity(dumped["test"]), rel=1e-6)
    assert metrics["interp_ppl"] <= metrics["lm_ppl"] * (1 + 1e-9)  # λ=0 is on the grid
    assert metrics["oracle_ppl"] <= metrics["interp_ppl"]


def test_retrieval_refuses_mismatched_inputs(caches, tmp_path):
    dumped, store_path, index = caches
    with pytest.raises(KnnlmError, match="--similarity"):
        dump_retrieval(RetrievalConfig(cache=str(dumped["valid"]), datastore=str(store_path)))
    with pytest.raises(KnnlmError, match="--real-score"):
        dump_retrieval(RetrievalConfig(cache=str(dumped["valid"]), datastore=str(store_path), similarity="ip",
                                       real_score=True))


def fairseq_knnlm_ppl(checkpoint: Path, data: Path, store: Path, index: Path | None, extra: list[str]) -> float:
    args = [str(data), "--user-dir", str(Path(knnlm.__file__).parent), "--path", str(checkpoint),
            "--task", "knnlm_language_modeling", "--gen-subset", "test", "--tokens-per-sample", str(TPS),
            "--context-window", str(CW), "--max-tokens", "256", "--cpu", "--num-workers", "0",
            "--dstore-filename", str(store), "--knn-keytype", "att", *extra]
    if index is not None:
        args += ["--indexfile", str(index)]
    proc = run_module("fairseq_cli.eval_lm", args)
    return float(re.search(r"Perplexity: ([0-9.]+)", proc.stdout + proc.stderr).group(1))


@pytest.mark.parametrize("lam,temperature,full", [(0.25, 1.0, False), (0.6, 3.0, False), (0.6, 3.0, True)])
def test_one_pass_fairseq_task_equals_two_phase_path(caches, tiny_checkpoint, tiny_data_bin, lam, temperature, full):
    """Targets only (the default) and the whole distribution (--knn-full-distribution) agree with the caches."""
    dumped, store_path, index = caches
    k = 8
    dump_retrieval(RetrievalConfig(cache=str(dumped["test"]), datastore=str(store_path), index=str(index),
                                   k_max=32, device="cpu", overwrite=True))
    dump_retrieval(RetrievalConfig(cache=str(dumped["valid"]), datastore=str(store_path), index=str(index),
                                   k_max=32, device="cpu", overwrite=True))
    line = score(Cache(dumped["valid"]), Cache(dumped["test"]),
                 ScoreSetting(key_type="att", similarity="l2", k=k, temperature=temperature, lam=lam))
    one_pass = fairseq_knnlm_ppl(tiny_checkpoint, tiny_data_bin, store_path, index,
                                 ["--k", str(k), "--lmbda", str(lam), "--knn-temp", str(temperature),
                                  *(["--knn-full-distribution"] if full else [])])
    assert one_pass == pytest.approx(line["metrics"]["interp_ppl"], rel=2e-4)


def test_fairseq_task_exact_search_with_real_scores(caches, tiny_checkpoint, tiny_data_bin):
    dumped, store_path, _ = caches
    dump_retrieval(RetrievalConfig(cache=str(dumped["test"]), datastore=str(store_path), similarity="l2",
                                   k_max=32, device="cpu", overwrite=True))
    dump_retrieval(RetrievalConfig(cache=str(dumped["valid"]), datastore=str(store_path), similarity="l2",
                                   k_max=32, device="cpu", overwrite=True))
    line = score(Cache(dumped["valid"]), Cache(dumped["test"]),
                 ScoreSetting(key_type="att", similarity="l2", k=16, temperature=1.0, lam=0.25,
                              mask_source="real", score_source="real"))
    one_pass = fairseq_knnlm_ppl(tiny_checkpoint, tiny_data_bin, store_path, None,
                                 ["--k", "16", "--lmbda", "0.25", "--knn-similarity", "l2"])
    assert one_pass == pytest.approx(line["metrics"]["interp_ppl"], rel=2e-4)


# -- provenance: a cache or retrieval is reused only for the inputs it was made from ---------------


def test_dump_refuses_a_complete_cache_of_other_inputs(caches, tiny_checkpoint, tiny_data_bin, tmp_path):
    dumped, _, _ = caches
    cfg = LMDumpConfig(checkpoint=str(tiny_checkpoint), data=str(tiny_data_bin), out=str(tmp_path / "c"),
                       split="valid", tokens_per_sample=TPS, context_window=CW, max_tokens=256, device="cpu",
                       limit_tokens=300)
    dump_lm(cfg)
    before = (tmp_path / "c" / "lm_logprob.npy").read_bytes()
    assert dump_lm(cfg) == tmp_path / "c"  # the same inputs: complete already
    for change in ({"limit_tokens": 200}, {"context_window": CW // 2}, {"split": "test"}):
        with pytest.raises(KnnlmError, match="holds a cache of other inputs.*--overwrite"):
            dump_lm(LMDumpConfig(**{**cfg.__dict__, **change}))
        assert (tmp_path / "c" / "lm_logprob.npy").read_bytes() == before  # untouched
    dump_lm(LMDumpConfig(**{**cfg.__dict__, "limit_tokens": 200, "overwrite": True}))
    assert Cache(tmp_path / "c").n_tokens == 200


def test_dump_validates_options_before_loading_a_model(tmp_path):
    bad = {"limit_tokens": 0, "max_tokens": -5, "tokens_per_sample": 0, "context_window": -1}
    for option, value in bad.items():
        cfg = LMDumpConfig(checkpoint=str(tmp_path / "no.pt"), data=str(tmp_path), out=str(tmp_path / "c"),
                           **{option: value})
        with pytest.raises(KnnlmError, match=option.replace("_", "-")):
            dump_lm(cfg)


def test_retrieve_refuses_contradicting_options_before_taking_the_cache_lock(caches):
    """Two retrievals into one cache: the one with bad options gets its own error, not "cache is busy"."""
    from knnlm.io import WriterLock

    contradictions = {
        r"--real-score .*give --index": {"real_score": True, "similarity": "l2"},
        r"exact search needs --similarity": {},
        r"--nprobe applies to an index": {"similarity": "l2", "nprobe": 4},
        r"unknown similarity 'cos'": {"similarity": "cos"},
    }
    splits, store, _ = caches
    cache = str(splits["valid"])
    with WriterLock.for_folder(cache, "cache held by the test"):
        for message, options in contradictions.items():
            with pytest.raises(KnnlmError, match=message):
                dump_retrieval(RetrievalConfig(cache=cache, datastore=str(store), **options))


def test_retrieve_reuses_its_own_result_and_refuses_to_replace_another(caches, tmp_path):
    import shutil

    dumped, store_path, index = caches
    cache = tmp_path / "valid"
    shutil.copytree(dumped["valid"], cache, ignore=shutil.ignore_patterns("knn"))
    meta = __import__("json").loads((cache / "meta.json").read_text())
    meta["retrievals"], meta["k_max"] = [], 0
    (cache / "meta.json").write_text(__import__("json").dumps(meta))
    cfg = RetrievalConfig(cache=str(cache), datastore=str(store_path), index=str(index), k_max=8, device="cpu")
    folder = dump_retrieval(cfg)
    ids = (folder / "ids.npy").read_bytes()
    assert np.load(folder / "ids.npy").dtype == np.int32 and np.load(folder / "vals.npy").dtype == np.int32
    assert dump_retrieval(cfg) == folder  # complete already
    with pytest.raises(KnnlmError, match="retrieval of other settings.*k: 8 -> 4.*--overwrite"):
        dump_retrieval(RetrievalConfig(**{**cfg.__dict__, "k_max": 4}))
    assert (folder / "ids.npy").read_bytes() == ids and Cache(cache).retrieval(folder.name).info.k_max == 8
    dump_retrieval(RetrievalConfig(**{**cfg.__dict__, "k_max": 4, "overwrite": True}))
    assert Cache(cache).retrieval(folder.name).info.k_max == 4


def test_retrieve_refuses_a_datastore_of_another_checkpoint(caches, tmp_path):
    from knnlm.datastore import write_datastore

    dumped, store_path, _ = caches
    real = Datastore.open(store_path)
    other = write_datastore(tmp_path / "other", np.asarray(real.keys), np.asarray(real.vals), key_type="att",
                            source={**real.meta["source"], "checkpoint_sha256": "0" * 64})
    cfg = RetrievalConfig(cache=str(dumped["test"]), datastore=str(other.path), similarity="ip", k_max=4,
                          device="cpu")
    with pytest.raises(KnnlmError, match="another checkpoint|different spaces"):
        dump_retrieval(cfg)
    folder = dump_retrieval(RetrievalConfig(**{**cfg.__dict__, "allow_other_checkpoint": True}))
    info = Cache(dumped["test"]).retrieval(folder.name).info
    assert info.datastore["other_checkpoint"] is True and info.datastore["checkpoint_sha256"] == "0" * 64


def test_a_linked_cache_takes_the_neighbours_of_a_rebuilt_datastore(caches, tiny_checkpoint, tiny_data_bin, tmp_path,
                                                                     capsys):
    """Figures 2/4 with a datastore rebuilt from half the training tokens: its neighbours go into a linked
    cache (the tokens' arrays shared, no LM pass), leaving the full datastore's retrievals where they are."""
    from knnlm.cli import main as cli_main
    from knnlm.evaluation.dump import link_cache

    dumped, _, _ = caches
    (half,) = build_datastore(
        DatastoreBuildConfig(
            checkpoint=str(tiny_checkpoint), data=str(tiny_data_bin), out=str(tmp_path / "ds-half"), key_types=["att"],
            tokens_per_sample=TPS, context_window=CW, max_tokens=256, subsample=0.5, device="cpu",
        )
    )
    before = Cache(dumped["valid"]).retrieval_names
    linked = {}
    for split in ("valid", "test"):
        assert cli_main.main(["eval", "link", "--cache", str(dumped[split]), "--out", str(tmp_path / split)]) == 0
        linked[split] = tmp_path / split
        assert (linked[split] / "query_att.npy").is_symlink() and Cache(linked[split]).retrieval_names == []
        dump_retrieval(RetrievalConfig(cache=str(linked[split]), datastore=str(half), similarity="l2", k_max=8,
                                       device="cpu"))
    assert "arrays linked to" in capsys.readouterr().out
    assert link_cache(dumped["valid"], linked["valid"]) == linked["valid"]  # complete already: kept as it is
    assert Cache(linked["valid"]).retrieval_names == ["att-l2-real"]
    assert Cache(dumped["valid"]).retrieval_names == before
    line = score(Cache(linked["valid"]), Cache(linked["test"]),
                 ScoreSetting(k=8, mask_source="real", score_source="real"))
    knobs = line["knobs"]
    assert knobs["subsample_method"] == "datastore_rebuild" and knobs["datastore_subsample"] == 0.5
    assert knobs["datastore_fraction"] == 0.5 and knobs["datastore_size"] == Datastore.open(half).num_keys
    with pytest.raises(KnnlmError, match="cache of other inputs"):
        link_cache(dumped["test"], linked["valid"])
