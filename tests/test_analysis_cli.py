"""`knnlm analyze`: each analysis end to end on tiny synthetic caches, plus its hydra config."""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from pathlib import Path

import numpy as np
import pytest

from knnlm.analysis.vocab import read_binarized_stream, read_dictionary
from knnlm.cli import analyze as analyze_cli
from knnlm.cli import main as cli_main
from knnlm.cli.configs import config_dir
from knnlm.errors import KnnlmError
from knnlm.evaluation.cache import RetrievalArrays, RetrievalInfo, write_cache

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_WORDS = 30
VOCAB = 4 + N_WORDS
DIM = 6
K_MAX = 8
N_TOKENS = 400
# training counts spanning five decades, most frequent first as in a fairseq dict.txt
COUNTS = [max(1, int(50000 / 1.5**i)) for i in range(N_WORDS)]


def _retrieval(rng, targets, name, mask, p_hit):
    """Neighbours whose values carry the target with probability ``p_hit``, best first."""
    vals = rng.integers(4, VOCAB, size=(len(targets), K_MAX))
    hit = rng.random((len(targets), K_MAX)) < p_hit
    vals[hit] = np.broadcast_to(targets[:, None], vals.shape)[hit]
    scores = -np.sort(rng.exponential(1.0, size=(len(targets), K_MAX)), axis=1)
    ids = rng.integers(0, 10_000, size=(len(targets), K_MAX))
    info = RetrievalInfo(name, "att", "l2", mask, mask, K_MAX, datastore={"path": "ds", "size": 10_000})
    return RetrievalArrays(info, ids, scores, vals)


def make_analysis_cache(path: Path, split: str, seed: int, spread: float, clustered_is_easy: bool = False) -> Path:
    """A cache over a 34-symbol dictionary: targets, LM log-probs, att queries, positions, FAISS and real retrievals.

    With ``clustered_is_easy``, half the tokens sit close to their word's centre and get
    a high LM probability, the other half are scattered and get a low one.
    """
    rng = np.random.default_rng(seed)
    p = np.array(COUNTS, dtype=np.float64) ** 0.5
    targets = 4 + rng.choice(N_WORDS, size=N_TOKENS, p=p / p.sum())
    targets[::25] = 2  # some </s>
    centres = np.random.default_rng(99).normal(0.0, 3.0, size=(VOCAB, DIM))
    if clustered_is_easy:
        tight = rng.random(N_TOKENS) < 0.5
        noise = np.where(tight, 0.2, spread)[:, None] * rng.normal(size=(N_TOKENS, DIM))
        lm = np.log(np.where(tight, rng.uniform(0.6, 0.9, N_TOKENS), rng.uniform(0.01, 0.3, N_TOKENS)))
    else:
        noise = rng.normal(0.0, spread, size=(N_TOKENS, DIM))
        lm = np.log(rng.uniform(0.01, 0.9, size=N_TOKENS))
    queries = centres[targets] + noise
    return write_cache(
        path,
        split=split,
        targets=targets,
        lm_logprob=lm,
        dict_size=VOCAB,
        checkpoint_fingerprint=f"sha256:model-{spread}",
        key_dims={"att": DIM},
        retrievals=[
            _retrieval(rng, targets, "att-l2-faiss", "faiss", 0.3),
            _retrieval(rng, targets, "att-l2-real", "real", 0.4),
        ],
        query_att=queries,
        positions=np.arange(N_TOKENS) % 64,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("analysis")
    data_bin = root / "data-bin"
    data_bin.mkdir()
    words = [f"w{'x' * (i % 7)}{i}" for i in range(N_WORDS)]
    (data_bin / "dict.txt").write_text("".join(f"{w} {c}\n" for w, c in zip(words, COUNTS, strict=True)))
    rng = np.random.default_rng(5)
    lines = [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(200)]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return {
        "root": root,
        "data_bin": data_bin,
        "text": root / "train.txt",
        "model0": make_analysis_cache(root / "omega0" / "test", "test", seed=1, spread=2.0),
        "model1": make_analysis_cache(root / "omega1" / "test", "test", seed=2, spread=3.0, clustered_is_easy=True),
        "valid0": make_analysis_cache(root / "omega0" / "valid", "valid", seed=3, spread=2.0),
    }


@pytest.fixture
def knnlm(monkeypatch):
    """The `knnlm` entry point with the analyze sub-command registered."""
    monkeypatch.setattr(cli_main, "COMMANDS", ["analyze"])
    return cli_main.main


def _outputs(out: Path, name: str) -> dict:
    png = out / f"{name}.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    assert (out / f"{name}.csv").stat().st_size > 0
    return json.loads((out / f"{name}.json").read_text())


def test_frequency_histograms_for_two_models(knnlm, data, tmp_path):
    argv = ["analyze", "frequency", "--cache", str(data["model0"]), "--cache", str(data["model1"])]
    argv += ["--label", "ω=0", "--label", "ω=1", "--data-bin", str(data["data_bin"]), "--out", str(tmp_path)]
    assert knnlm([*argv, "--k", "8", "--lambda", "0.3"]) == 0
    summary = _outputs(tmp_path, "frequency_loss")
    assert summary["edges"] == [1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0]
    assert [m["label"] for m in summary["models"]] == ["ω=0", "ω=1"]
    first = summary["models"][0]
    assert sum(b["n_words"] for b in first["bins"]) == N_WORDS
    assert sum(b["n_tokens"] for b in first["bins"]) + first["excluded_tokens"] == N_TOKENS
    assert first["excluded_tokens"] == N_TOKENS // 25  # the </s> targets
    assert first["lambda_used"] == 0.3 and first["retrieval"] == "att-l2-faiss"


def test_clustering_separates_low_and_high_loss(knnlm, data, tmp_path):
    argv = ["analyze", "clustering", "--cache", str(data["model0"]), "--cache", str(data["model1"])]
    argv += ["--dict", str(data["data_bin"] / "dict.txt"), "--out", str(tmp_path), "--k", "8"]
    argv += ["--n-words", "6", "--components", "3", "--loss-source", "lm", "--bins", "20"]
    assert knnlm(argv) == 0
    summary = _outputs(tmp_path, "clustering")
    assert summary["settings"]["components"] == 3 and len(summary["words"]) == 6
    random, clustered = (m["separation_low_vs_high"] for m in summary["models"])
    for model in summary["models"]:
        sep = model["separation_low_vs_high"]
        assert sep["n_a"] + sep["n_b"] == model["n_selected_tokens"] > 0
        assert model["lambda_used"] is None  # LM loss: no kNN part computed
    # model 1: low-loss tokens are the tightly clustered ones -> clearly higher likelihood
    assert clustered["cohens_d"] > 1.0 and clustered["auc"] > 0.8 and clustered["ks_statistic"] > 0.5
    assert abs(random["cohens_d"]) < 0.5 and random["auc"] < clustered["auc"]


def test_benefit_against_length_and_entropy(knnlm, data, tmp_path):
    argv = ["analyze", "benefit", "--cache", str(data["model0"]), "--data-bin", str(data["data_bin"])]
    argv += ["--text", str(data["text"]), "--out", str(tmp_path), "--k", "8", "--min-count", "5"]
    assert knnlm(argv) == 0
    summary = _outputs(tmp_path, "benefit")
    assert summary["retrievals"] == {"faiss": "att-l2-faiss", "real": "att-l2-real"}
    assert summary["n_words"] > 5
    assert set(summary["trends"]) == {"faiss", "real", "difference"}
    assert set(summary["trends"]["faiss"]) == {"length", "forward_entropy", "backward_entropy"}
    rows = (tmp_path / "benefit.csv").read_text().splitlines()
    assert rows[0].startswith("id,word,occurrences,train_count,length,forward_entropy,backward_entropy,share_faiss")
    assert len(rows) == summary["n_words"] + 1


def test_benefit_needs_a_training_stream(knnlm, data, tmp_path, capsys):
    argv = ["analyze", "benefit", "--cache", str(data["model0"]), "--dict", str(data["data_bin"] / "dict.txt")]
    assert knnlm([*argv, "--out", str(tmp_path), "--k", "8"]) == 2
    assert "--data-bin DIR (its train split) or --text FILE" in capsys.readouterr().err


def test_binarized_stream_is_the_token_sequence(data, tmp_path):
    import torch
    from fairseq.data.indexed_dataset import MMapIndexedDatasetBuilder

    vocab = read_dictionary(data["data_bin"] / "dict.txt")
    builder = MMapIndexedDatasetBuilder(str(tmp_path / "train.bin"), dtype=np.uint16)
    for line in ([4, 5, 2], [6, 2], [7, 4, 4, 2]):
        builder.add_item(torch.tensor(line))
    builder.finalize(str(tmp_path / "train.idx"))
    assert read_binarized_stream(tmp_path / "train", vocab).tolist() == [4, 5, 2, 6, 2, 7, 4, 4, 2]
    with pytest.raises(KnnlmError, match="not found"):
        read_binarized_stream(tmp_path / "valid", vocab)


def test_position_with_lambda_tuned_on_validation(knnlm, data, tmp_path):
    argv = ["analyze", "position", "--cache", str(data["model0"]), "--out", str(tmp_path), "--k", "8"]
    assert knnlm([*argv, "--lambda", "tune", "--valid-cache", str(data["valid0"]), "--bucket-size", "16"]) == 0
    summary = _outputs(tmp_path, "position")
    (model,) = summary["models"]
    assert 0.0 <= model["lambda_used"] <= 1.0
    assert [b["start"] for b in model["buckets"]] == [0, 16, 32, 48]
    assert sum(b["n_tokens"] for b in model["buckets"]) == N_TOKENS


def test_lambda_is_never_tuned_on_the_analysed_split(knnlm, data, tmp_path, capsys):
    argv = ["analyze", "position", "--cache", str(data["model0"]), "--out", str(tmp_path), "--k", "8"]
    assert knnlm([*argv, "--lambda", "tune", "--valid-cache", str(data["model0"])]) == 2
    assert "tuned on the split it is reported on" in capsys.readouterr().err
    assert knnlm([*argv, "--lambda", "tune"]) == 2
    assert "one --valid-cache per --cache" in capsys.readouterr().err


def test_stolen_probabilities_from_npy(knnlm, data, tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(VOCAB, 5)).astype(np.float32)
    w[10] = 0.3 * (w[20] + w[21] + w[22]) / 3  # strictly inside the hull
    np.save(tmp_path / "w.npy", w)
    argv = ["analyze", "stolen", "--weights", str(tmp_path / "w.npy"), "--data-bin", str(data["data_bin"])]
    assert knnlm([*argv, "--out", str(tmp_path), "--n-random", "32"]) == 0
    summary = _outputs(tmp_path, "stolen_probabilities")
    vocab = read_dictionary(data["data_bin"] / "dict.txt")
    assert vocab.symbols[10] in summary["not_argmaxable"]
    assert summary["n_argmaxable"] + summary["n_not_argmaxable"] + summary["n_undecided"] == VOCAB
    assert summary["n_needed_lp"] >= 1 and summary["decided_by"]["lp"] >= 1
    assert set(summary["seconds"]) == {"self", "random", "greedy", "lp", "total"}


def test_errors_name_the_file_and_the_fix(knnlm, data, tmp_path, capsys):
    bad = tmp_path / "dict.txt"
    bad.write_text("a 3\nb 2\n")
    argv = ["analyze", "frequency", "--cache", str(data["model0"]), "--dict", str(bad), "--out", str(tmp_path)]
    assert knnlm(argv) == 2
    err = capsys.readouterr().err
    assert "dict_size 34" in err and str(bad) in err
    argv = ["analyze", "frequency", "--cache", str(data["model0"]), "--data-bin", str(data["data_bin"])]
    assert knnlm([*argv, "--out", str(tmp_path), "--k", "64"]) == 2
    assert "exceeds k_max=8" in capsys.readouterr().err
    assert knnlm([*argv, "--out", str(tmp_path), "--k", "8", "--mask-source", "real", "--score-source", "faiss"]) == 2
    assert "has no retrieval with key type att" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(analyze_cli.ANALYSES))
def test_hydra_configs_match_the_options(name):
    """Each configs/analyze/<name>.yaml lists exactly the options of the analysis, with the same defaults."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir("analyze")), version_base="1.3"):
        cfg = compose(name)
    from omegaconf import OmegaConf

    options = OmegaConf.to_container(cfg, resolve=True)
    assert options.pop("analysis") == name
    options["lam"] = options.pop("lambda", None) if "lambda" in options else None
    if options["lam"] is None:
        del options["lam"]
    spec = {f.name: f for f in fields(analyze_cli.config_class(name))}
    assert set(options) == set(spec)
    for key, value in options.items():
        default = spec[key].default
        assert value == ("???" if default is MISSING else default), key


def test_hydra_config_runs_through_the_same_code(data, tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    overrides = [f"caches=[{data['model0']},{data['model1']}]", "labels=[a,b]", f"out={tmp_path}", "k=8"]
    with initialize_config_dir(config_dir=str(config_dir("analyze")), version_base="1.3"):
        cfg = compose("position", overrides=overrides)
    files = analyze_cli.run_analysis("position", OmegaConf.to_container(cfg, resolve=True))
    assert [f.name for f in files] == ["position.csv", "position.png", "position.json"]
    one = analyze_cli.build_config("position", {"out": str(tmp_path), "caches": str(data["model0"])})
    assert one.caches == [str(data["model0"])]
    with pytest.raises(KnnlmError, match="needs --cache"):
        analyze_cli.run_analysis("position", {"out": str(tmp_path)})
    with pytest.raises(KnnlmError, match="has no option bogus"):
        analyze_cli.run_analysis("position", {"out": str(tmp_path), "caches": ["x"], "bogus": 1})
