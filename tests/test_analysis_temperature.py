"""`knnlm analyze temperature`: the τ curves against brute force, the scale law, the weight norms, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from knnlm import scoring
from knnlm.analysis.temperature import (
    LastLayer,
    TemperatureConfig,
    curve_of,
    layer_norm_input_shares,
    mean_squared_norm,
    query_decomposition,
    run,
    temperature_grid,
    token_mean_share,
    weight_norms,
)
from knnlm.cli import main as cli_main
from knnlm.errors import KnnlmError
from knnlm.evaluation.cache import Cache, RetrievalArrays, RetrievalInfo, write_cache
from knnlm.models.fairseq_lm import load_language_model

VOCAB, DIM, N_KEYS, N_TOKENS, K = 12, 5, 60, 80, 16


def _l2_cache(path, split: str, scale: float, seed: int = 0):
    """A cache whose neighbours are the exact L2 top-K of its queries over a datastore, all scaled by ``scale``."""
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(N_KEYS, DIM)) * scale
    key_vals = rng.integers(0, VOCAB, size=N_KEYS)
    queries = rng.normal(size=(N_TOKENS, DIM)) * scale
    dist = ((queries[:, None, :] - keys[None, :, :]) ** 2).sum(-1)
    ids = np.argsort(dist, axis=1)[:, :K]
    # the target is often a near neighbour's value, so the kNN part helps at some temperatures
    near = key_vals[ids[np.arange(N_TOKENS), rng.integers(0, 3, size=N_TOKENS)]]
    targets = np.where(rng.random(N_TOKENS) < 0.7, near, rng.integers(0, VOCAB, size=N_TOKENS))
    scores = -np.take_along_axis(dist, ids, axis=1)
    info = RetrievalInfo("att-l2-real", "att", "l2", "real", "real", K, datastore={"path": "ds", "size": N_KEYS})
    write_cache(
        path,
        split=split,
        targets=targets,
        lm_logprob=np.log(rng.uniform(0.02, 0.6, size=N_TOKENS)),
        dict_size=VOCAB,
        checkpoint_fingerprint="sha256:tiny",
        key_dims={"att": DIM},
        retrievals=[RetrievalArrays(info, ids, scores, key_vals[ids])],
        query_att=queries,
    )
    return Cache(path)


def _config(tmp_path, caches, **kw) -> TemperatureConfig:
    base = dict(out=tmp_path / "out", caches=caches, k=K, mask_source="real", score_source="real")
    return TemperatureConfig(**{**base, **kw})


def test_grid_is_geometric_and_holds_one():
    grid = temperature_grid(0.1, 1000.0, 41)
    assert len(grid) == 41 and 1.0 in grid and grid[0] == pytest.approx(0.1) and grid[-1] == pytest.approx(1000.0)
    assert np.allclose(np.diff(np.log10(grid)), 0.1)
    assert 1.0 in temperature_grid(0.3, 7.0, 5) and len(temperature_grid(0.3, 7.0, 5)) == 6
    for bad in ((0.0, 1.0, 5), (2.0, 1.0, 5), (0.1, 1.0, 1)):
        with pytest.raises(KnnlmError):
            temperature_grid(*bad)


def test_mean_squared_norm_of_chunked_fp16_rows():
    rows = np.random.default_rng(1).normal(size=(70_000, 3)).astype(np.float16)
    exact = float(np.mean(np.sum(rows.astype(np.float64) ** 2, axis=1)))
    assert mean_squared_norm(rows) == pytest.approx(exact, rel=1e-12)


def test_curve_matches_brute_force(tmp_path):
    cache = _l2_cache(tmp_path / "valid", "valid", scale=1.0)
    taus = np.array([0.5, 1.0, 4.0])
    curve = curve_of("m", cache, _config(tmp_path, [cache.path]), taus)
    r = cache.retrieval("att-l2-real")
    lm = np.asarray(cache.lm_logprob, dtype=np.float64)
    for i, tau in enumerate(taus):
        knn = np.empty(N_TOKENS)
        for t in range(N_TOKENS):
            w = [math.exp(float(s) / tau) for s in r.scores[t]]
            hit = sum(wj for wj, v in zip(w, r.vals[t], strict=True) if v == cache.targets[t])
            knn[t] = math.log(hit / sum(w)) if hit > 0 else -math.inf
        lam = curve.lambdas[i]
        mixed = np.log((1 - lam) * np.exp(lm) + lam * np.exp(knn))
        assert curve.ppl[i] == pytest.approx(math.exp(-mixed.mean()), rel=1e-6)  # fp32 scores, fp32 sums
        covered = np.isfinite(knn)
        assert curve.covered == pytest.approx(covered.mean()) and 0.3 < curve.covered < 1.0
        assert curve.knn_ppl[i] == pytest.approx(math.exp(-knn[covered].mean()), rel=1e-6)
        # λ is the best of the 0.01 grid on this very split
        grid = np.linspace(0, 1, 101)
        with np.errstate(divide="ignore"):
            nll = [-np.log((1 - g) * np.exp(lm) + g * np.exp(knn)).mean() for g in grid]
        assert lam == pytest.approx(grid[int(np.argmin(nll))])


def test_scaling_keys_and_queries_is_a_temperature(tmp_path):
    """Keys and queries ×√10 give the same curve at τ ×10 (ten grid steps of 10^0.1)."""
    a = _l2_cache(tmp_path / "a", "valid", scale=1.0)
    b = _l2_cache(tmp_path / "b", "valid", scale=math.sqrt(10.0))
    taus = temperature_grid(0.1, 1000.0, 41)
    x1 = curve_of("x1", a, _config(tmp_path, [a.path]), taus)
    x10 = curve_of("x10", b, _config(tmp_path, [b.path]), taus)
    np.testing.assert_allclose(x10.ppl[10:], x1.ppl[:-10], rtol=1e-4)
    np.testing.assert_allclose(x10.knn_ppl[10:], x1.knn_ppl[:-10], rtol=1e-4)
    # at the same τ the larger scale is a 10x colder distribution: not the same numbers
    assert not np.allclose(x10.ppl, x1.ppl, rtol=1e-3)
    (json_file,) = [f for f in run(_config(tmp_path, [a.path, b.path], labels=["x1", "x10"])) if f.suffix == ".json"]
    m1, m10 = json.loads(json_file.read_text())["models"]
    assert m10["mean_query_sq_norm"] == pytest.approx(10 * m1["mean_query_sq_norm"], rel=2e-3)


def test_weight_norms_read_the_layer_norm_in_front_of_fc1(tmp_path):
    gain, fc1 = torch.full((8,), 0.5), torch.ones(16, 8)
    state = {
        "model": {
            "decoder.layers.0.fc1.weight": torch.zeros(16, 8),
            "decoder.layers.1.fc1.weight": fc1,
            "decoder.layers.1.final_layer_norm.weight": gain,
            "decoder.layers.1.final_layer_norm.bias": torch.zeros(8),
            "decoder.layers.1.self_attn_layer_norm.weight": torch.ones(8),
        },
        "cfg": {"model": {"decoder_normalize_before": True}},
    }
    torch.save(state, tmp_path / "pre.pt")
    norms = weight_norms(tmp_path / "pre.pt")
    assert norms["layer_norm"] == "decoder.layers.1.final_layer_norm"
    assert norms["layer_norm_gain_norm"] == pytest.approx(0.5 * math.sqrt(8))
    assert norms["fc1_weight_norm"] == pytest.approx(math.sqrt(16 * 8))
    state["cfg"]["model"]["decoder_normalize_before"] = False
    torch.save(state, tmp_path / "post.pt")
    assert weight_norms(tmp_path / "post.pt")["layer_norm_gain_norm"] == pytest.approx(math.sqrt(8))
    torch.save({"model": {"encoder.x": torch.ones(1)}}, tmp_path / "other.pt")
    with pytest.raises(KnnlmError, match="not a fairseq transformer LM"):
        weight_norms(tmp_path / "other.pt")


def test_cli_writes_the_figure_table_and_test_numbers(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_main, "COMMANDS", ["analyze"])
    valid = _l2_cache(tmp_path / "valid", "valid", scale=1.0)
    test = _l2_cache(tmp_path / "test", "test", scale=1.0, seed=1)
    out = tmp_path / "out"
    argv = ["analyze", "temperature", "--cache", str(valid.path), "--test-cache", str(test.path), "--out", str(out)]
    knobs = ["--k", str(K), "--mask-source", "real", "--score-source", "real", "--tau-points", "21"]
    assert cli_main.main([*argv, *knobs]) == 0
    summary = json.loads((out / "temperature.json").read_text())
    (model,) = summary["models"]
    assert len(summary["taus"]) == 21 and model["test"]["tuned"] > 0 and model["test"]["lm"] > 0
    assert (out / "temperature.png").read_bytes()[:4] == b"\x89PNG"
    assert len((out / "temperature.csv").read_text().splitlines()) == 1 + 21
    # τ is tuned on the cache given: a test cache there is refused
    assert cli_main.main(["analyze", "temperature", "--cache", str(test.path), "--out", str(out), *knobs]) == 2
    assert "must not be the test split" in capsys.readouterr().err
    argv = ["analyze", "temperature", "--cache", str(valid.path), "--datastore", "a", "--datastore", "b"]
    assert cli_main.main([*argv, "--out", str(out), *knobs]) == 2
    assert "2 --datastore for 1 --cache" in capsys.readouterr().err


def _with_lm(cache: Cache, path, lm: np.ndarray) -> Cache:
    """A copy of ``cache`` (same tokens and neighbours) whose LM gives ``lm`` instead."""
    r = cache.retrieval("att-l2-real")
    write_cache(
        path,
        split=cache.split,
        targets=np.asarray(cache.targets),
        lm_logprob=lm,
        dict_size=VOCAB,
        checkpoint_fingerprint="sha256:other",
        key_dims={"att": DIM},
        retrievals=[RetrievalArrays(r.info, np.asarray(r.ids), np.asarray(r.scores), np.asarray(r.vals))],
        query_att=np.load(cache.path / "query_att.npy"),
    )
    return Cache(path)


def test_shared_lm_mixes_each_models_knn_with_one_lm(tmp_path):
    """With a shared LM the curve is the brute-force mix of that LM and the model's own kNN distribution."""
    a = _l2_cache(tmp_path / "a", "valid", scale=1.0)
    lm_b = np.log(np.random.default_rng(5).uniform(0.01, 0.3, size=N_TOKENS))
    b = _with_lm(a, tmp_path / "b", lm_b)
    taus = np.array([0.5, 2.0])
    cfg = _config(tmp_path, [a.path, b.path], labels=["a", "b"], shared_lm_cache=b.path)
    own, shared = curve_of("a", a, cfg, taus), curve_of("a", a, cfg, taus, lm=lm_b)
    assert shared.lm_ppl == pytest.approx(math.exp(-lm_b.mean()))
    knn_at_2 = scoring.knn_logprob_grid(
        a.retrieval("att-l2-real").scores, a.retrieval("att-l2-real").vals, a.targets, [K], [2.0]
    )[0][0]
    lam = shared.lambdas[1]
    mixed = np.log((1 - lam) * np.exp(lm_b) + lam * np.exp(knn_at_2))
    assert shared.ppl[1] == pytest.approx(math.exp(-mixed.mean()), rel=1e-9)
    assert not np.allclose(shared.ppl, own.ppl)
    (json_file,) = [f for f in run(cfg) if f.suffix == ".json"]
    ma, mb = json.loads(json_file.read_text())["models"]
    assert ma["shared_lm"]["lm"] == "b" and ma["shared_lm"]["lm_ppl"] == pytest.approx(mb["lm_ppl"])
    # b mixed with itself is b's own curve
    assert mb["shared_lm"]["tuned"]["ppl"] == pytest.approx(mb["tuned"]["ppl"])
    header = (tmp_path / "out" / "temperature.csv").read_text().splitlines()[0]
    assert header.endswith("lambda_shared_lm,ppl_shared_lm")


def test_shared_lm_of_other_tokens_is_refused(tmp_path):
    a = _l2_cache(tmp_path / "a", "valid", scale=1.0)
    other = _l2_cache(tmp_path / "other", "valid", scale=1.0, seed=3)  # other targets
    cfg = _config(tmp_path, [a.path], shared_lm_cache=other.path)
    with pytest.raises(KnnlmError, match="do not hold the same tokens"):
        run(cfg)
    with pytest.raises(KnnlmError, match="needs --shared-lm-cache"):
        run(_config(tmp_path, [a.path], shared_lm_test_cache=other.path))


def test_query_decomposition_undoes_the_layer_norm(tmp_path):
    """Queries q = g ⊙ LN(x) + b with x a constant vector plus noise: the share is that of x̂'s token mean."""
    rng = np.random.default_rng(2)
    d, n = 8, 5000
    x = 30.0 * rng.normal(size=d) + rng.normal(size=(n, d))
    xhat = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    gain, bias = rng.uniform(0.2, 1.5, size=d), rng.normal(size=d)
    queries = (gain * xhat + bias).astype(np.float32)
    state = {
        "model": {
            "decoder.layers.0.fc1.weight": torch.zeros(4, d),
            "decoder.layers.0.final_layer_norm.weight": torch.tensor(gain),
            "decoder.layers.0.final_layer_norm.bias": torch.tensor(bias),
        },
        "cfg": {"model": {"decoder_normalize_before": True}},
    }
    torch.save(state, tmp_path / "m.pt")
    out = query_decomposition(queries, LastLayer.load(tmp_path / "m.pt"))
    q = queries.astype(np.float64)
    mean = q.mean(0)
    assert out["query_mean_vector_sq_norm"] == pytest.approx(mean @ mean, rel=1e-9)
    assert out["query_spread"] == pytest.approx(((q - mean) ** 2).sum(1).mean(), rel=1e-6)
    share = (xhat.mean(0) ** 2).sum() / (xhat**2).sum(1).mean()
    assert 0.9 < share < 1.0 and out["ln_input_mean_share"] == pytest.approx(share, rel=1e-5)
    assert set(query_decomposition(queries)) == {"query_mean_vector_sq_norm", "query_spread"}


def test_token_mean_share_against_brute_force():
    rng = np.random.default_rng(4)
    noise = rng.normal(size=(400, 6))
    for rows in (noise, 50.0 * rng.normal(size=6) + noise):
        xhat = [(r - r.mean()) / r.std() for r in rows]
        mean = sum(xhat) / len(xhat)
        expected = float(mean @ mean) / (sum(float(x @ x) for x in xhat) / len(xhat))
        assert token_mean_share(rows) == pytest.approx(expected, rel=1e-9)
    assert token_mean_share(noise) < 0.05 and token_mean_share(50.0 * rng.normal(size=6) + noise) > 0.99


def test_layer_norm_input_shares_of_a_checkpoint(tiny_checkpoint, tiny_data_bin):
    """One share per LayerNorm of the decoder; a constant added to every position's input raises the first."""
    shares = layer_norm_input_shares(tiny_checkpoint, tiny_data_bin, n_tokens=256)
    model, _ = load_language_model(tiny_checkpoint, tiny_data_bin)
    names = {n for n, m in model.decoder.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert set(shares) == names and all(0.0 <= v <= 1.0 for v in shares.values())
    state = torch.load(tiny_checkpoint, weights_only=False)
    embed = state["model"]["decoder.embed_tokens.weight"]
    shifted_embed = embed + 100.0 * embed.abs().max() * torch.randn(embed.shape[-1])
    for name in ("decoder.embed_tokens.weight", "decoder.output_projection.weight"):  # tied: both are loaded
        if name in state["model"]:
            state["model"][name] = shifted_embed
    shifted = tiny_checkpoint.parent / "shifted.pt"
    torch.save(state, shifted)
    first = "layers.0.self_attn_layer_norm"  # the first LayerNorm, pre-norm or post-norm: its input holds the embedding
    assert layer_norm_input_shares(shifted, tiny_data_bin, n_tokens=256)[first] > max(0.9, shares[first])
