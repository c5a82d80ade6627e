"""The score phase: `score()` results, `knnlm score` grids and the hydra sweep app."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from knnlm import scoring
from knnlm.cli import main as cli_main
from knnlm.cli.score import run_score
from knnlm.errors import KnnlmError
from knnlm.evaluation.cache import Cache
from knnlm.evaluation.score import ScoreSetting, expand_grid, score, score_grid
from tests.test_score_cache import K_MAX, make_cache

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("score")
    # the kNN part is far more useful on test than on validation: the λ tuned on each differs
    return (
        make_cache(root / "valid", "valid", seed=1, p_follow=0.2),
        make_cache(root / "test", "test", seed=2, p_follow=0.9),
    )


@pytest.fixture
def knnlm(monkeypatch):
    """The `knnlm` entry point with (only) the score and report sub-commands registered."""
    monkeypatch.setattr(cli_main, "COMMANDS", ["score", "report"])
    return cli_main.main


def _knn(cache: Cache, setting: ScoreSetting) -> np.ndarray:
    r = cache.find(*setting.retrieval_knobs)
    return scoring.knn_logprob(
        np.asarray(r.scores), np.asarray(r.vals), np.asarray(cache.targets), setting.k, setting.temperature
    )


def test_score_reports_every_knob_and_metric(caches):
    valid, test = Cache(caches[0]), Cache(caches[1])
    setting = ScoreSetting(k=16, temperature=0.7)
    result = score(valid, test, setting)
    json.dumps(result, allow_nan=False)  # strict JSON
    knobs, metrics = result["knobs"], result["metrics"]
    assert result["schema"] == "knnlm.score/1"
    assert knobs["k"] == 16 and knobs["temperature"] == 0.7 and knobs["lambda"] == "tune"
    assert knobs["split"] == "test" and knobs["subsample_method"] == "none" and knobs["datastore_fraction"] == 1.0
    assert knobs["checkpoint"] == valid.checkpoint_fingerprint and knobs["datastore_size"] == 400
    assert result["provenance"]["retrieval"] == "att-l2-faiss"
    lm_valid, lm_test = np.asarray(valid.lm_logprob, float), np.asarray(test.lm_logprob, float)
    knn_valid, knn_test = _knn(valid, setting), _knn(test, setting)
    lam = scoring.tune_lambda(lm_valid, knn_valid)
    assert metrics["lambda_used"] == lam and metrics["lambda_tuned_on"] == "valid"
    assert metrics["n_tokens"] == test.n_tokens
    assert metrics["lm_ppl"] == pytest.approx(math.exp(-lm_test.mean()))
    assert metrics["interp_ppl"] == pytest.approx(scoring.perplexity(scoring.interpolate(lm_test, knn_test, lam)).ppl)
    assert metrics["oracle_ppl"] == pytest.approx(scoring.perplexity(np.maximum(lm_test, knn_test)).ppl)
    zero = int(np.isneginf(knn_test).sum())
    assert zero > 0 and metrics["knn_ppl"] == "inf" and metrics["knn_zero_mass"] == zero
    assert metrics["neighbours_used_mean"] == 16 and metrics["tokens_short_of_k"] == 0


def test_lambda_is_tuned_on_validation_never_on_test(caches):
    valid, test = Cache(caches[0]), Cache(caches[1])
    setting = ScoreSetting(k=K_MAX)
    lm_valid, lm_test = np.asarray(valid.lm_logprob, float), np.asarray(test.lm_logprob, float)
    on_valid = scoring.tune_lambda(lm_valid, _knn(valid, setting))
    on_test = scoring.tune_lambda(lm_test, _knn(test, setting))
    assert on_valid != on_test
    assert score(valid, test, setting)["metrics"]["lambda_used"] == on_valid
    # reporting on validation says that λ was tuned on the reported split
    on_self = score(valid, None, ScoreSetting(k=K_MAX, split="valid"))
    assert on_self["metrics"]["lambda_used"] == on_valid and on_self["metrics"]["tuned_on_reported_split"]
    with pytest.raises(KnnlmError, match="never on test"):
        score(test, valid, setting)
    fixed = score(valid, test, ScoreSetting(k=K_MAX, lam=0.25))["metrics"]
    assert fixed["lambda_used"] == 0.25 and fixed["lambda_tuned_on"] is None


def test_grid_equals_settings_scored_one_by_one(caches):
    valid, test = Cache(caches[0]), Cache(caches[1])
    settings = expand_grid(
        k=[4, 32], temperature=[0.5, 2.0], lam=["tune", 0.3], mask_source=["faiss", "real"], score_source=["real"]
    )
    assert len(settings) == 16
    together = list(score_grid(valid, test, settings))
    for s in settings[::5]:
        alone = score(valid, test, s)
        match = [r for r in together if r["knobs"] == alone["knobs"]]
        assert len(match) == 1 and match[0]["metrics"] == alone["metrics"]


def test_subsampled_line_says_how(caches):
    valid, test = Cache(caches[0]), Cache(caches[1])
    result = score(valid, test, ScoreSetting(k=16, subsample_ratio=0.25, subsample_seed=3))
    knobs, metrics = result["knobs"], result["metrics"]
    assert knobs["subsample_method"] == "score_time_filter" and knobs["datastore_fraction"] == 0.25
    assert knobs["subsample_seed"] == 3
    assert metrics["neighbours_used_mean"] < 16 and metrics["tokens_short_of_k"] > 0  # the approximation


def test_cli_grid_appends_one_line_per_setting(caches, tmp_path, knnlm):
    out = tmp_path / "results.jsonl"
    args = ["score", "--valid-cache", str(caches[0]), "--test-cache", str(caches[1]), "--out", str(out)]
    grid = ["--k", "8,32", "--temperature", "0.5:1.5:0.5", "--lambda", "tune,0.25", "--label", "seed=2"]
    assert knnlm([*args, *grid]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2 * 3 * 2
    assert {line["knobs"]["temperature"] for line in lines} == {0.5, 1.0, 1.5}
    assert all(line["knobs"]["labels"] == {"seed": 2} for line in lines)
    assert knnlm([*args, "--k", "8", "--split", "valid"]) == 0
    assert len(out.read_text().splitlines()) == 13


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mask-source", "real", "--score-source", "faiss"], "no att/l2/real/faiss retrieval"),
        (["--k", "64"], "exceeds k_max=32"),
        (["--temperature", "0:1:0.3"], "whole number of steps"),
        (["--temperature", "0"], "must be > 0"),
        (["--lambda", "2"], "--lambda"),
        (["--key-type", "emb"], "not one of att, ffn"),
    ],
)
def test_cli_refuses_bad_settings(caches, tmp_path, knnlm, capsys, extra, message):
    args = ["score", "--valid-cache", str(caches[0]), "--test-cache", str(caches[1]), "--out", str(tmp_path / "r")]
    assert knnlm([*args, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_skip_missing_and_split_test_needs_a_test_cache(caches, tmp_path, knnlm, capsys):
    out = tmp_path / "r.jsonl"
    base = ["score", "--valid-cache", str(caches[0]), "--out", str(out), "--k", "8"]
    assert knnlm(base) == 2 and "--test-cache" in capsys.readouterr().err
    grid = ["--test-cache", str(caches[1]), "--mask-source", "faiss,real", "--score-source", "faiss,real"]
    assert knnlm([*base, *grid, "--skip-missing"]) == 0
    assert len(out.read_text().splitlines()) == 3  # real mask + FAISS score is not in the caches


def _hydra(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "knnlm.cli.score", *overrides], cwd=cwd, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_hydra_sweep_config_runs_one_job_per_setting(caches, tmp_path):
    _hydra(
        tmp_path,
        "--config-name",
        "sweep_temperature",
        f"valid_cache={caches[0]}",
        f"test_cache={caches[1]}",
        "out=sweep.jsonl",
        "k=16",
        'hydra.sweeper.params.temperature="0.5,1.0"',
    )
    lines = [json.loads(line) for line in (tmp_path / "sweep.jsonl").read_text().splitlines()]
    got = sorted((ln["knobs"]["temperature"], ln["knobs"]["mask_source"], ln["knobs"]["score_source"]) for ln in lines)
    assert got == [(0.5, "faiss", "faiss"), (0.5, "real", "real"), (1.0, "faiss", "faiss"), (1.0, "real", "real")]
    # lists inside one job's config: one pass over the caches, the same numbers
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(REPO / "configs" / "score"), version_base="1.3"):
        cfg = compose(
            "score",
            overrides=[
                f"valid_cache={caches[0]}",
                f"test_cache={caches[1]}",
                f"out={tmp_path / 'grid.jsonl'}",
                "k=16",
                "temperature=[0.5,1.0]",
                'mask_source="faiss,real"',
                "score_source=[faiss,real]",
                "skip_missing=true",
            ],
        )
    assert run_score(OmegaConf.to_container(cfg)) == 6
    grid = [json.loads(line) for line in (tmp_path / "grid.jsonl").read_text().splitlines()]
    for line in lines:
        twin = [g for g in grid if g["knobs"] == line["knobs"]]
        assert twin and twin[0]["metrics"] == line["metrics"]


def test_sweep_configs_compose():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "configs" / "score"), version_base="1.3"):
        for name, knob in [
            ("sweep_temperature", "temperature"),
            ("sweep_k", "k"),
            ("sweep_lambda", "lambda"),
            ("sweep_subsample", "subsample_ratio"),
        ]:
            cfg = compose(name, return_hydra_config=True, overrides=["valid_cache=v", "out=o"])
            assert knob in cfg.hydra.sweeper.params, name
            assert cfg.hydra.mode.name == "MULTIRUN"
        from hydra.core.override_parser.overrides_parser import OverridesParser

        cfg = compose("sweep_temperature", return_hydra_config=True)
        sweep = OverridesParser.create().parse_overrides([f"t={cfg.hydra.sweeper.params.temperature}"])[0]
        values = [round(v, 10) for v in sweep.sweep_iterator()]
        assert values == [round(0.1 * i, 10) for i in range(1, 31)]
