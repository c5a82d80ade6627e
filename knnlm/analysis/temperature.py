"""Is a regularizer's kNN gain a temperature in disguise? (Ton et al.'s ω against Xu et al.'s τ)

With L2 similarity a neighbour's weight is ``exp(−‖q − k‖² / τ)``. Multiplying every
key and query by ``c`` multiplies ``‖q − k‖²`` by ``c²``: exactly the change of
``τ → τ / c²``. The activation-L2 penalty (Ton et al. 2022) shrinks the keys, so part
of its gain at τ = 1 may be a softer kNN distribution that a tuned τ gives the
unregularized model too.

For each model this analysis measures the scale of its representations — mean ‖r‖²
of the datastore keys and of the queries, split into a token-independent part and the
spread that distances see, and the norms of the last layer's weights that set it (the
LayerNorm gain in front of the FFN, whose output is the ``att`` key, and ``fc1`` that
reads it) — and the kNN-LM perplexity over a geometric τ grid, λ
tuned on the same validation split at every τ. Two panels: perplexity against τ,
and against τ / mean‖q‖² (the temperature in units of the model's own scale; curves
that coincide there differ by scale alone). Reading the numbers:

* ω = 0 at its tuned τ matching ω = 1 at τ = 1 says the τ = 1 gain is reachable by τ;
* ω = 1 still better than ω = 0 when both use their own tuned τ is a representational
  effect; equal is a temperature effect.

Regularization can change the LM as well as the keys, and a worse LM leaves more for the
kNN part to win back. ``shared_lm_cache`` separates the two: every model's kNN distribution is
also interpolated with *one* LM (that cache's ``p_LM`` of the same tokens), so the models then
differ only in their retrieval.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from knnlm import scoring
from knnlm.datastore.store import Datastore
from knnlm.errors import KnnlmError
from knnlm.evaluation.cache import Cache
from knnlm.evaluation.score import TUNE

from .inputs import KnnKnobs, labels_for, open_retrieval
from .outputs import write_csv, write_json
from .plots import PAIR_COLOURS, new_figure, paper_style, save_figure

logger = logging.getLogger(__name__)

NAME = "temperature"
_CHUNK_ROWS = 1 << 16


@dataclass(kw_only=True)
class TemperatureConfig(KnnKnobs):
    """``knnlm analyze temperature``: the options (defaults shared with configs/analyze/temperature.yaml).

    ``caches`` are validation caches (τ and λ are tuned on them); ``test_caches``,
    ``datastores`` and ``checkpoints`` are optional, one per model, in the same order.
    """

    out: str | Path
    caches: list[str | Path]
    labels: list[str] | None = None
    lam: float | str = TUNE  # tuned at every τ on the validation cache, or one number for all
    test_caches: list[str | Path] | None = None  # perplexity at the τ and λ chosen on the validation cache
    datastores: list[str | Path] | None = None  # mean ‖k‖² of the keys
    checkpoints: list[str | Path] | None = None  # fairseq checkpoints: LayerNorm gain and fc1 norms
    tau_min: float = 0.001
    tau_max: float = 1000.0
    tau_points: int = 61  # geometric grid from tau_min to tau_max (10 a decade); τ = 1 is always added
    shared_lm_cache: str | Path | None = None  # validation cache whose p_LM every model's p_kNN is also mixed with
    shared_lm_test_cache: str | Path | None = None  # its test cache (with test_caches)
    data_bin: str | Path | None = None  # with checkpoints: LayerNorm inputs over the first valid tokens
    probe_tokens: int = 4096


def temperature_grid(tau_min: float, tau_max: float, points: int) -> np.ndarray:
    """``points`` geometrically spaced temperatures from ``tau_min`` to ``tau_max``, plus τ = 1, sorted."""
    if not (0 < tau_min < tau_max and math.isfinite(tau_max)):
        raise KnnlmError(f"--tau-min {tau_min} and --tau-max {tau_max} must satisfy 0 < min < max < inf")
    if points < 2:
        raise KnnlmError(f"--tau-points {points} must be at least 2")
    grid = np.geomspace(tau_min, tau_max, points)
    near_one = np.isclose(grid, 1.0, rtol=1e-9, atol=0.0)
    grid[near_one] = 1.0  # a grid through 1 keeps its point there, exactly
    return grid if near_one.any() else np.sort(np.append(grid, 1.0))


def mean_squared_norm(rows: np.ndarray) -> float:
    """Mean ‖r‖² over the rows of a (memory-mapped, possibly fp16) [N, D] array, summed in float64."""
    return _mean_row(rows)[1]


def _model_cfg(state: dict[str, Any]) -> dict[str, Any]:
    cfg = state.get("cfg")
    model = cfg.get("model") if isinstance(cfg, dict) else getattr(cfg, "model", None)
    if model is None:
        model = state.get("args")
    if model is None:
        return {}
    return dict(model) if isinstance(model, dict) else dict(vars(model))


@dataclass(frozen=True)
class LastLayer:
    """The last decoder layer of a fairseq transformer LM checkpoint, read once for every statistic of it.

    ``norm`` is its LayerNorm in front of ``fc1`` (whose output is the att key): pre-norm layers
    normalize with ``final_layer_norm`` there, post-norm layers with ``self_attn_layer_norm``
    (see :mod:`knnlm.models.capture`).
    """

    name: str
    norm: str
    weights: dict[str, Any]

    @classmethod
    def load(cls, checkpoint: str | Path) -> LastLayer:
        import torch

        path = Path(checkpoint)
        if not path.is_file():
            raise KnnlmError(f"--checkpoint {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # a pickle of anything else fails in many ways
            raise KnnlmError(f"--checkpoint {path} is not a readable fairseq checkpoint ({err})") from None
        weights = state.get("model") if isinstance(state, dict) else None
        if not isinstance(weights, dict):
            raise KnnlmError(f"--checkpoint {path} has no 'model' state dict; pass a fairseq checkpoint")
        pattern = r"decoder\.layers\.(\d+)\.fc1\.weight$"
        layers = [int(m.group(1)) for name in weights if (m := re.match(pattern, name))]
        if not layers:
            raise KnnlmError(f"--checkpoint {path}: no decoder.layers.N.fc1.weight; not a fairseq transformer LM")
        last = f"decoder.layers.{max(layers)}"
        pre_norm = bool(_model_cfg(state).get("decoder_normalize_before", True))
        return cls(last, f"{last}.{'final_layer_norm' if pre_norm else 'self_attn_layer_norm'}", weights)

    def norms(self) -> dict[str, Any]:
        """Norms of the LayerNorm in front of ``fc1`` and of ``fc1``."""

        def l2(name: str) -> float | None:
            tensor = self.weights.get(name)
            return None if tensor is None else float(tensor.double().norm())

        gain = self.weights.get(f"{self.norm}.weight")
        return {
            "layer_norm": self.norm,
            "layer_norm_gain_norm": l2(f"{self.norm}.weight"),
            "layer_norm_gain_mean_abs": None if gain is None else float(gain.double().abs().mean()),
            "layer_norm_bias_norm": l2(f"{self.norm}.bias"),
            "fc1_weight_norm": l2(f"{self.name}.fc1.weight"),
        }


def weight_norms(checkpoint: str | Path) -> dict[str, Any]:
    """Norms of the last decoder layer's LayerNorm in front of ``fc1`` (whose output is the att key) and of ``fc1``."""
    return LastLayer.load(checkpoint).norms()


def _mean_row(rows: np.ndarray, transform: Any = None) -> tuple[np.ndarray, float]:
    """(mean row, mean squared row norm) of ``transform(rows)``, chunked, in float64."""
    total, sq = np.zeros(rows.shape[1]), 0.0
    for start in range(0, len(rows), _CHUNK_ROWS):
        chunk = np.asarray(rows[start : start + _CHUNK_ROWS], dtype=np.float64)
        chunk = chunk if transform is None else transform(chunk)
        total += chunk.sum(0)
        sq += float(np.einsum("ij,ij->", chunk, chunk))
    n = max(len(rows), 1)
    return total / n, sq / n


def query_decomposition(queries: np.ndarray, layer: LastLayer | None = None) -> dict[str, float]:
    """How the queries' mean ‖q‖² splits into a token-independent part and the spread L2 distances see.

    ``mean‖q‖² = ‖mean q‖² + mean‖q − mean q‖²``; only the second term enters ``‖q − k‖²``.
    With the model's last layer, the LayerNorm is undone (``x̂ = (q − b) / g``): the share of the normalized
    input's energy in its token mean says whether keys were shrunk through the gain or by a
    token-independent vector in the residual stream that the LayerNorm bias cancels.
    """
    mean, sq = _mean_row(queries)
    out = {"query_mean_vector_sq_norm": float(mean @ mean), "query_spread": sq - float(mean @ mean)}
    if layer is not None:
        gain, bias = layer.weights.get(f"{layer.norm}.weight"), layer.weights.get(f"{layer.norm}.bias")
        if gain is not None and bias is not None and len(gain) == queries.shape[1]:
            g, b = gain.double().numpy(), bias.double().numpy()
            kept = np.abs(g) > 1e-6 * np.abs(g).max()  # a zero gain erases its coordinate
            x_mean, x_sq = _mean_row(queries, lambda q: (q[:, kept] - b[kept]) / g[kept])
            out["ln_input_mean_share"] = float(x_mean @ x_mean) / x_sq
    return out


def token_mean_share(rows: np.ndarray) -> float:
    """Share of the LayerNorm-normalized rows' energy in their mean over tokens: ``‖mean x̂‖² / mean ‖x̂‖²``.

    0 when the token-dependent variation is all there is; near 1 when every row is one
    vector plus a small token-dependent rest, which normalization then squashes.
    """
    x = np.asarray(rows, dtype=np.float64)
    centred = x - x.mean(axis=1, keepdims=True)
    xhat = centred / np.maximum(centred.std(axis=1, keepdims=True), 1e-12)
    mean = xhat.mean(axis=0)
    return float(mean @ mean) / float(np.einsum("ij,ij->", xhat, xhat) / len(xhat))


def layer_norm_input_shares(checkpoint: str | Path, data_bin: str | Path, n_tokens: int = 4096) -> dict[str, float]:
    """:func:`token_mean_share` of the input of every LayerNorm of a fairseq LM, over the first valid tokens.

    Run in windows of the checkpoint's ``tokens_per_sample`` (whole windows, at most ``n_tokens``).
    """
    import torch
    from fairseq.data import data_utils

    from knnlm.models.fairseq_lm import load_language_model

    model, task = load_language_model(checkpoint, data_bin)
    model.eval()
    dataset = data_utils.load_indexed_dataset(str(Path(data_bin) / "valid"), task.dictionary)
    if dataset is None:
        raise KnnlmError(f"--data-bin {data_bin}: no valid split (valid.bin/valid.idx)")
    window = int(getattr(task.cfg, "tokens_per_sample", 512) or 512)
    stream, size = [], 0
    for i in range(len(dataset)):
        stream.append(dataset[i])
        size += len(dataset[i])
        if size >= n_tokens:
            break
    tokens = torch.cat(stream)
    n_windows = max(1, min(len(tokens), n_tokens) // window)
    tokens = tokens[: n_windows * window].view(n_windows, -1)
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [
        module.register_forward_hook(lambda m, i, o, name=name: inputs.setdefault(name, []).append(i[0].detach()))
        for name, module in model.decoder.named_modules()
        if isinstance(module, torch.nn.LayerNorm)
    ]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: token_mean_share(torch.cat(x).reshape(-1, x[0].shape[-1]).numpy()) for name, x in inputs.items()}


@dataclass
class TemperatureCurve:
    """One model on the validation split: the kNN-LM over the τ grid, λ tuned at each τ."""

    label: str
    taus: np.ndarray
    lambdas: np.ndarray  # tuned at each τ
    ppl: np.ndarray  # kNN-LM perplexity at (τ, its tuned λ)
    knn_ppl: np.ndarray  # the kNN distribution alone (λ = 1), over the tokens it gives mass (covered)
    covered: float  # fraction of tokens whose target is among the k neighbours (the same at every τ)
    lm_ppl: float

    def at(self, tau: float) -> int:
        return int(np.argmin(np.abs(np.log(self.taus) - math.log(tau))))

    @property
    def best(self) -> int:
        return int(np.argmin(self.ppl))


def shared_lm_logprob(shared: Cache, cache: Cache) -> np.ndarray:
    """The shared LM's log-probabilities of ``cache``'s tokens; refused unless both hold the same tokens."""
    if shared.split != cache.split or not np.array_equal(shared.targets, cache.targets):
        raise KnnlmError(
            f"--shared-lm-cache {shared.path} ({shared.split}, {shared.n_tokens:,} tokens) and {cache.path} "
            f"({cache.split}, {cache.n_tokens:,} tokens) do not hold the same tokens; dump both from one split "
            "with the same window and EVAL_LIMIT"
        )
    return np.asarray(shared.lm_logprob, dtype=np.float64)


def curve_of(
    label: str, cache: Cache, cfg: TemperatureConfig, taus: np.ndarray, lm: np.ndarray | None = None
) -> TemperatureCurve:
    """kNN-LM perplexity of ``cache`` at each τ (one pass over its neighbours for the whole grid).

    ``lm`` replaces the cache's own ``log p_LM(target)`` (a shared LM; see :func:`shared_lm_logprob`).
    """
    retrieval = open_retrieval(cache, cfg.knobs)
    lm = np.asarray(cache.lm_logprob, dtype=np.float64) if lm is None else lm
    grid = scoring.knn_logprob_grid(
        retrieval.scores, retrieval.vals, cache.targets, [cfg.k], list(taus), ids=retrieval.ids
    )[0]
    lambdas = np.array([scoring.tune_lambda(lm, knn) if cfg.lam == TUNE else float(cfg.lam) for knn in grid])
    ppl = np.array(
        [scoring.perplexity(scoring.interpolate(lm, knn, lam)).ppl for knn, lam in zip(grid, lambdas, strict=True)]
    )
    covered = np.isfinite(grid[0])
    knn_ppl = np.array([scoring.perplexity(knn[covered]).ppl if covered.any() else math.inf for knn in grid])
    return TemperatureCurve(label, taus, lambdas, ppl, knn_ppl, float(covered.mean()), scoring.perplexity(lm).ppl)


def _test_ppl(
    cache: Cache, cfg: TemperatureConfig, settings: dict[str, tuple[float, float]], lm: np.ndarray | None = None
) -> dict[str, float]:
    """Test perplexity at each named (τ, λ) chosen on the validation split, and the LM's own."""
    retrieval = open_retrieval(cache, cfg.knobs)
    lm = np.asarray(cache.lm_logprob, dtype=np.float64) if lm is None else lm
    taus = [tau for tau, _ in settings.values()]
    knn = scoring.knn_logprob_grid(retrieval.scores, retrieval.vals, cache.targets, [cfg.k], taus, ids=retrieval.ids)[0]
    out = {"lm": scoring.perplexity(lm).ppl}
    for (name, (_, lam)), knn_at_tau in zip(settings.items(), knn, strict=True):
        out[name] = scoring.perplexity(scoring.interpolate(lm, knn_at_tau, lam)).ppl
    return out


def _per_model(option: str, values: list[str | Path] | None, n: int) -> list[str | Path | None]:
    if not values:
        return [None] * n
    if len(values) != n:
        raise KnnlmError(f"{len(values)} {option} for {n} --cache; give one per --cache, in the same order")
    return list(values)


def plot_curves(
    curves: list[TemperatureCurve],
    scales: list[float],
    path: Path,
    shared: list[TemperatureCurve | None] | None = None,
    shared_label: str = "",
) -> Path:
    """kNN-LM perplexity against τ (left) and τ / mean‖q‖² (right); ○ τ = 1, ★ the tuned τ.

    ``shared`` curves (each model's kNN with the shared LM) are drawn dashed in the same colour.
    """
    with paper_style():
        fig, (raw, scaled) = new_figure(2, sharey=True)
        dashed: list[TemperatureCurve | None] = list(shared) if shared else [None] * len(curves)
        for colour, curve, extra, scale in zip(PAIR_COLOURS * 4, curves, dashed, scales, strict=False):
            for ax, x in ((raw, curve.taus), (scaled, curve.taus / scale)):
                for c, style, label in ((curve, "-", curve.label), (extra, "--", f"{curve.label}, LM {shared_label}")):
                    if c is None:
                        continue
                    ax.plot(x, c.ppl, style, color=colour, label=label)
                    one, best = c.at(1.0), c.best
                    ax.plot(x[one], c.ppl[one], "o", color=colour, fillstyle="none")
                    ax.plot(x[best], c.ppl[best], "*", color=colour, markersize=7)
        for ax in (raw, scaled):
            ax.set_xscale("log")
        raw.set_xlabel("temperature τ")
        scaled.set_xlabel("τ / mean ‖q‖² (scale-free temperature)")
        raw.set_ylabel("kNN-LM perplexity (valid, λ tuned)")
        scaled.set_ylabel("kNN-LM perplexity (valid, λ tuned)")
        raw.legend(frameon=False)
        return save_figure(fig, path)


def run(cfg: TemperatureConfig) -> list[Path]:
    """Scale statistics and τ curves of each model; write CSV, PNG and JSON under ``cfg.out``."""
    cfg.knobs.check()
    if not cfg.caches:
        raise KnnlmError("give at least one --cache DIR (a validation cache per model)")
    if cfg.similarity != "l2" and not cfg.retrieval:
        logger.warning(
            "--similarity %s: the scale argument holds for L2; with IP τ scales like c², not c", cfg.similarity
        )
    taus = temperature_grid(cfg.tau_min, cfg.tau_max, cfg.tau_points)
    n = len(cfg.caches)
    labels = labels_for(cfg.caches, cfg.labels)
    tests = _per_model("--test-cache", cfg.test_caches, n)
    stores = _per_model("--datastore", cfg.datastores, n)
    checkpoints = _per_model("--checkpoint", cfg.checkpoints, n)
    shared = Cache(cfg.shared_lm_cache) if cfg.shared_lm_cache else None
    shared_test = Cache(cfg.shared_lm_test_cache) if cfg.shared_lm_test_cache else None
    if shared_test is not None and shared is None:
        raise KnnlmError("--shared-lm-test-cache needs --shared-lm-cache (the λ and τ are chosen on valid)")
    shared_label = ""  # the shared LM's model label when it is one of the caches, else its path
    if shared is not None:
        same = [lab for lab, c in zip(labels, cfg.caches, strict=True) if Path(c).resolve() == shared.path.resolve()]
        shared_label = same[0] if same else str(shared.path)
    models, curves, scales, shared_curves = [], [], [], []
    for label, path, test, store, checkpoint in zip(labels, cfg.caches, tests, stores, checkpoints, strict=True):
        cache = Cache(path)
        if cache.split == "test":
            raise KnnlmError(f"--cache {cache.path}: τ and λ are tuned on it, so it must not be the test split")
        query_file = cache.path / f"query_{cfg.key_type}.npy"
        if not query_file.is_file():
            raise KnnlmError(f"{query_file} is missing: re-run the dump keeping the {cfg.key_type} queries")
        layer = LastLayer.load(checkpoint) if checkpoint is not None else None
        entry: dict[str, Any] = {"label": label, "cache": str(cache.path), "n_tokens": cache.n_tokens}
        entry.update(query_decomposition(np.load(query_file, mmap_mode="r"), layer))
        query_sq = entry["query_mean_vector_sq_norm"] + entry["query_spread"]  # one pass over the queries
        entry["mean_query_sq_norm"] = query_sq
        if store is not None:
            ds = Datastore.open(store, key_type=cfg.key_type)
            entry["datastore"] = str(ds.path)
            entry["mean_key_sq_norm"] = mean_squared_norm(ds.keys)
        if layer is not None:
            entry.update(layer.norms())
            if cfg.data_bin is not None:
                entry["layer_norm_input_token_mean_share"] = layer_norm_input_shares(
                    checkpoint, cfg.data_bin, cfg.probe_tokens
                )
        curve = curve_of(label, cache, cfg, taus)
        one, best = curve.at(1.0), curve.best
        knn_best = int(np.argmin(curve.knn_ppl))
        entry["knn_covered_fraction"] = curve.covered
        entry.update(
            lm_ppl=curve.lm_ppl,
            tau1={"ppl": curve.ppl[one], "lambda": curve.lambdas[one], "knn_ppl_covered": curve.knn_ppl[one]},
            tuned={"tau": curve.taus[best], "ppl": curve.ppl[best], "lambda": curve.lambdas[best]},
            knn_only_tuned={"tau": curve.taus[knn_best], "knn_ppl_covered": curve.knn_ppl[knn_best]},
            tuned_tau_over_query_sq_norm=curve.taus[best] / query_sq,
        )
        if test is not None:
            entry["test"] = _test_ppl(
                Cache(test),
                cfg,
                {"tau1": (1.0, curve.lambdas[one]), "tuned": (curve.taus[best], curve.lambdas[best])},
            )
        if shared is not None:
            with_shared = curve_of(label, cache, cfg, taus, lm=shared_lm_logprob(shared, cache))
            one_s, best_s = with_shared.at(1.0), with_shared.best
            entry["shared_lm"] = {
                "lm": shared_label,
                "lm_ppl": with_shared.lm_ppl,
                "tau1": {"ppl": with_shared.ppl[one_s], "lambda": with_shared.lambdas[one_s]},
                "tuned": {"tau": taus[best_s], "ppl": with_shared.ppl[best_s], "lambda": with_shared.lambdas[best_s]},
            }
            if test is not None and shared_test is not None:
                test_cache = Cache(test)
                entry["shared_lm"]["test"] = _test_ppl(
                    test_cache,
                    cfg,
                    {
                        "tau1": (1.0, with_shared.lambdas[one_s]),
                        "tuned": (taus[best_s], with_shared.lambdas[best_s]),
                    },
                    lm=shared_lm_logprob(shared_test, test_cache),
                )
            shared_curves.append(with_shared)
        models.append(entry)
        curves.append(curve)
        scales.append(query_sq)
        logger.info(
            "%s: mean‖q‖² %.3g, τ=1 %.2f, tuned τ=%.3g %.2f",
            label,
            query_sq,
            entry["tau1"]["ppl"],
            curve.taus[best],
            curve.ppl[best],
        )
    out = Path(cfg.out)
    columns = ["model", "tau", "tau_over_query_sq_norm", "lambda", "ppl", "knn_ppl_covered"]
    rows = [
        [c.label, tau, tau / s, lam, ppl, knn]
        for c, s in zip(curves, scales, strict=True)
        for tau, lam, ppl, knn in zip(c.taus, c.lambdas, c.ppl, c.knn_ppl, strict=True)
    ]
    # the shared LM's own model needs no dashed twin of its curve
    dashed = [None if c.label == shared_label else c for c in shared_curves]
    if shared_curves:
        columns += ["lambda_shared_lm", "ppl_shared_lm"]
        pairs = [(lam, ppl) for c in shared_curves for lam, ppl in zip(c.lambdas, c.ppl, strict=True)]
        rows = [[*row, *pair] for row, pair in zip(rows, pairs, strict=True)]
    files = [
        write_csv(out / f"{NAME}.csv", columns, rows),
        plot_curves(curves, scales, out / f"{NAME}.png", dashed or None, shared_label),
    ]
    summary = {"analysis": NAME, "knobs": cfg.knobs, "taus": taus, "models": models}
    files.append(write_json(out / f"{NAME}.json", summary))
    logger.info("temperature and scale: %s", ", ".join(str(f) for f in files))
    return files
