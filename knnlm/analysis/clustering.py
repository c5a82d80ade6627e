"""Representation clustering (Ton et al. 2022, Fig. 3): do low-loss tokens sit in denser regions?

A Gaussian mixture (``m`` = 10 components, seeded) is fitted on the key-layer
representations (``query_att``/``query_ffn`` of the cache) of the occurrences of the
most frequent training words; every representation then gets its log-likelihood
under the mixture. Tokens are split into high and low loss (loss of the LM, the
kNN part or the kNN-LM, above or below a quantile or a fixed threshold), and the
two log-likelihood histograms are compared: if regularization makes contexts of
the same word cluster, low-loss tokens get clearly higher likelihood. The gap is
reported as Cohen's d (low minus high, in pooled-std units), the KS statistic and
the AUC ``P(ll_low > ll_high)``.

Representations are standardized per dimension by default: an L2 activation
penalty shrinks the activations, and raw log-likelihoods of a smaller-scale model
would be higher for that reason alone (``--no-standardize`` keeps raw values).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.mixture import GaussianMixture

from knnlm.errors import KnnlmError
from knnlm.evaluation.cache import KEY_TYPES, Cache

from .inputs import ModelsConfig, ModelTokens, load_models
from .outputs import write_csv, write_json
from .plots import PAIR_COLOURS, new_figure, paper_style, save_figure
from .stats import Separation, separation
from .vocab import Vocabulary, read_dictionary, resolve_dictionary

logger = logging.getLogger(__name__)

NAME = "clustering"
LOSS_SOURCES = ("lm", "knn", "knnlm")
COVARIANCES = ("full", "tied", "diag", "spherical")
_STD_FLOOR = 1e-6


@dataclass(kw_only=True)
class ClusteringConfig(ModelsConfig):
    """``knnlm analyze clustering``: the options (defaults shared with configs/analyze/clustering.yaml)."""

    representation: str = "att"  # att | ffn: which cached query representation is clustered
    n_words: int = 100  # the most frequent training words whose occurrences are used
    max_tokens: int = 20000  # seeded subsample of their occurrences (GMM cost grows with it)
    components: int = 10
    covariance: str = "diag"  # full needs many more samples than dimensions per component
    per_word: bool = False  # one mixture per word instead of one over all selected words
    standardize: bool = True
    seed: int = 0
    loss_source: str = "knnlm"  # lm | knn | knnlm: which loss splits high from low
    loss_quantile: float = 0.5  # high loss: above this quantile of the selected tokens' loss
    loss_threshold: float | None = None  # or a fixed loss in nats (overrides the quantile)
    bins: int = 40


def gmm_loglik(
    x: np.ndarray,
    components: int = 10,
    *,
    covariance: str = "diag",
    seed: int = 0,
    standardize: bool = True,
    groups: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Log-likelihood of each row of ``x`` under a Gaussian mixture fitted on ``x``.

    With ``groups`` (e.g. the target word of each row), one mixture per group; groups
    with fewer rows than twice the components get NaN. Returns the log-likelihoods and
    fit diagnostics (converged, groups skipped).
    """
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {', '.join(COVARIANCES)}, got {covariance!r}")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"representations must be a non-empty [N, D] array, got {x.shape}")
    if standardize:
        x = (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), _STD_FLOOR)
    if groups is None:
        groups = np.zeros(x.shape[0], dtype=np.int64)
    out = np.full(x.shape[0], np.nan)
    converged, skipped = [], []
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        if rows.size < 2 * components:
            skipped.append(int(g))
            continue
        gmm = GaussianMixture(n_components=components, covariance_type=covariance, random_state=seed)
        gmm.fit(x[rows])
        converged.append(bool(gmm.converged_))
        out[rows] = gmm.score_samples(x[rows])
    if not converged:
        raise ValueError(f"no group has the {2 * components} rows a {components}-component mixture needs")
    return out, {"n_mixtures": len(converged), "all_converged": all(converged), "groups_skipped": skipped}


def loss_split(loss: np.ndarray, quantile: float = 0.5, threshold: float | None = None) -> tuple[np.ndarray, float]:
    """High-loss mask (loss above ``threshold``, or above the ``quantile`` of ``loss``) and the threshold used."""
    loss = np.asarray(loss, dtype=np.float64)
    if threshold is None:
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"loss quantile must be in (0, 1), got {quantile}")
        threshold = float(np.quantile(loss, quantile, method="inverted_cdf"))
    return loss > threshold, float(threshold)


def most_frequent_words(vocab: Vocabulary, n: int) -> np.ndarray:
    """Ids of the ``n`` most frequent ordinary words of the training set (ties: lower id first)."""
    counts = np.where(vocab.is_word, vocab.counts, -1)
    order = np.argsort(-counts, kind="stable")
    return order[: min(n, int((counts > 0).sum()))]


def open_queries(cache: Cache, representation: str) -> np.ndarray:
    """The memory-mapped ``query_<representation>.npy`` of a cache, checked against its meta data."""
    if representation not in KEY_TYPES:
        raise KnnlmError(f"--representation {representation!r} must be one of {', '.join(KEY_TYPES)}")
    path = cache.path / f"query_{representation}.npy"
    if not path.is_file():
        raise KnnlmError(f"{path} is missing: re-run the dump with the {representation} queries saved")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise KnnlmError(f"{path} is not a readable .npy file ({err}); re-run the dump") from err
    dim = cache.meta.get("key_dims", {}).get(representation)
    if arr.ndim != 2 or arr.shape[0] != cache.n_tokens or (dim is not None and arr.shape[1] != int(dim)):
        raise KnnlmError(f"{path} has shape {arr.shape}, meta.json says [{cache.n_tokens}, {dim}]; re-run the dump")
    return arr


@dataclass
class ModelClusters:
    """One model's selected tokens with their loss, GMM log-likelihood and high/low-loss group."""

    label: str
    rows: np.ndarray  # token indices into the cache
    targets: np.ndarray
    loss: np.ndarray
    loglik: np.ndarray
    high: np.ndarray  # bool
    threshold: float
    separation: Separation  # low-loss (a) vs high-loss (b) log-likelihoods
    fit: dict[str, Any]


def _loss(model: ModelTokens, source: str) -> np.ndarray:
    if source == "lm":
        return -model.lm
    if model.knn is None:
        raise KnnlmError(f"--loss-source {source} needs a retrieval")
    return -(model.knn if source == "knn" else model.interp)


def select_tokens(targets: np.ndarray, words: np.ndarray, max_tokens: int, seed: int) -> np.ndarray:
    """Sorted indices of the tokens whose target is in ``words`` (a seeded subsample of ``max_tokens``)."""
    rows = np.flatnonzero(np.isin(np.asarray(targets), words))
    if max_tokens and rows.size > max_tokens:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_tokens, replace=False))
    return rows


def cluster_model(model: ModelTokens, words: np.ndarray, cfg: ClusteringConfig) -> ModelClusters:
    """Fit the mixture on one model's representations and split its tokens by loss."""
    targets = np.asarray(model.cache.targets)
    rows = select_tokens(targets, words, cfg.max_tokens, cfg.seed)
    if rows.size < 2 * cfg.components:
        raise KnnlmError(
            f"{model.cache.path}: only {rows.size} occurrences of the {len(words)} most frequent words; "
            f"raise --n-words or lower --components"
        )
    x = np.asarray(open_queries(model.cache, cfg.representation)[rows], dtype=np.float64)
    groups = targets[rows] if cfg.per_word else None
    loglik, fit = gmm_loglik(
        x, cfg.components, covariance=cfg.covariance, seed=cfg.seed, standardize=cfg.standardize, groups=groups
    )
    loss = _loss(model, cfg.loss_source)[rows]
    high, threshold = loss_split(loss, cfg.loss_quantile, cfg.loss_threshold)
    fitted = np.isfinite(loglik)
    try:
        sep = separation(loglik[fitted & ~high], loglik[fitted & high])
    except ValueError as err:
        raise KnnlmError(
            f"{model.cache.path}: cannot compare high- and low-loss tokens ({err}); change --loss-quantile "
            f"or --loss-threshold"
        ) from err
    return ModelClusters(model.label, rows, targets[rows], loss, loglik, high, threshold, sep, fit)


def plot_clustering(results: list[ModelClusters], bins: int, loss_name: str, path: Path) -> Path:
    """Histograms (densities) of the log-likelihood of low- vs high-loss tokens, one panel per model."""
    with paper_style():
        fig, axes = new_figure(len(results))
        for ax, r in zip(axes, results, strict=True):
            ll = r.loglik[np.isfinite(r.loglik)]
            lo, hi = np.percentile(ll, [0.5, 100.0])
            edges = np.linspace(lo, hi, bins + 1)
            fitted = np.isfinite(r.loglik)
            for mask, name, colour in (
                (~r.high, f"low loss (≤ {r.threshold:.2f})", PAIR_COLOURS[0]),
                (r.high, "high loss", PAIR_COLOURS[1]),
            ):
                values = np.clip(r.loglik[mask & fitted], lo, hi)
                ax.hist(values, bins=edges, density=True, histtype="stepfilled", alpha=0.35, color=colour)
                ax.hist(
                    values, bins=edges, density=True, histtype="step", color=colour, label=f"{name}, n={values.size}"
                )
            s = r.separation
            ax.set_title(f"{r.label}\nd={s.cohens_d:.2f}, KS={s.ks_statistic:.2f}, AUC={s.auc:.2f}")
            ax.set_xlabel("log-likelihood under the GMM")
            ax.set_ylabel("density")
            ax.set_ylim(0.0, ax.get_ylim()[1] * 1.5)  # headroom: the legend never hides the bars
            ax.legend(frameon=False, loc="upper left", title=f"{loss_name} loss")
        return save_figure(fig, path)


def run(cfg: ClusteringConfig) -> list[Path]:
    """Cluster each model's representations; write CSV (per token), PNG and JSON under ``cfg.out``."""
    if cfg.loss_source not in LOSS_SOURCES:
        raise KnnlmError(f"--loss-source {cfg.loss_source!r} must be one of {', '.join(LOSS_SOURCES)}")
    if cfg.covariance not in COVARIANCES:
        raise KnnlmError(f"--covariance {cfg.covariance!r} must be one of {', '.join(COVARIANCES)}")
    if cfg.components < 1 or cfg.n_words < 1:
        raise KnnlmError("--components and --n-words must be at least 1")
    if cfg.loss_threshold is None and not 0.0 < cfg.loss_quantile < 1.0:
        raise KnnlmError(f"--loss-quantile {cfg.loss_quantile} must be in (0, 1)")
    vocab = read_dictionary(resolve_dictionary(cfg.dictionary, cfg.data_bin))
    models = load_models(
        cfg.caches, cfg.labels, cfg.knobs, vocab, need_knn=cfg.loss_source != "lm", valid_caches=cfg.valid_caches
    )
    words = most_frequent_words(vocab, cfg.n_words)
    results = [cluster_model(m, words, cfg) for m in models]
    out = Path(cfg.out)
    rows = [
        [r.label, int(i), int(t), vocab.symbols[int(t)], loss, ll, "high" if h else "low"]
        for r in results
        for i, t, loss, ll, h in zip(r.rows, r.targets, r.loss, r.loglik, r.high, strict=True)
    ]
    files = [
        write_csv(out / f"{NAME}.csv", ["model", "token", "target", "word", "loss", "loglik", "group"], rows),
        plot_clustering(
            results, cfg.bins, {"lm": "LM", "knn": "kNN", "knnlm": "kNN-LM"}[cfg.loss_source], out / f"{NAME}.png"
        ),
    ]
    summary = {
        "analysis": NAME,
        "dictionary": str(vocab.path),
        "knobs": cfg.knobs if cfg.loss_source != "lm" else None,
        "settings": cfg.settings(),
        "words": [vocab.symbols[int(w)] for w in words],
        "models": [
            {
                **m.describe(),
                "n_selected_tokens": int(r.rows.size),
                "loss_threshold": r.threshold,
                "n_high_loss": int(r.high.sum()),
                "fit": r.fit,
                "separation_low_vs_high": r.separation,
            }
            for m, r in zip(models, results, strict=True)
        ],
    }
    files.append(write_json(out / f"{NAME}.json", summary))
    logger.info("representation clustering: %s", ", ".join(str(f) for f in files))
    return files
