"""Word frequency vs loss (Ton et al. 2022, Fig. 2): where in the frequency spectrum the loss is.

Words are binned by their training count on a log scale (bins ``[10^(i/b), 10^((i+1)/b))``
for ``b`` bins per decade); each bin's bar is the number of dictionary words in it
and its colour the loss the model accumulates on the split over all occurrences of
those words, ``Σ −log p`` with the kNN-LM's p (λ, k, τ, retrieval). Panels side by
side compare models (e.g. ω = 0 and ω = 1) on one colour scale, so a darker bar
means more loss in absolute terms. fairseq's special symbols (``</s>``, ``<unk>``, …)
have no training count in ``dict.txt`` and words with count 0 (padding) are not
binned; the tokens they account for are reported as excluded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib import cm, colors

from knnlm import scoring
from knnlm.errors import KnnlmError

from .inputs import ModelsConfig, ModelTokens, load_models
from .outputs import write_csv, write_json
from .plots import new_figure, paper_style, save_figure
from .vocab import read_dictionary, resolve_dictionary

logger = logging.getLogger(__name__)

NAME = "frequency_loss"


@dataclass(kw_only=True)
class FrequencyConfig(ModelsConfig):
    """``knnlm analyze frequency``: the options (defaults shared with configs/analyze/frequency.yaml)."""

    bins_per_decade: int = 1


def log_bins(max_count: int, bins_per_decade: int = 1) -> np.ndarray:
    """Edges ``10^(i/b)`` from 1 up to the first edge above ``max_count`` (float64)."""
    if bins_per_decade < 1 or int(bins_per_decade) != bins_per_decade:
        raise ValueError(f"bins per decade must be a positive integer, got {bins_per_decade}")
    n = max(1, math.floor(math.log10(max(int(max_count), 1)) * bins_per_decade + 1e-9) + 1)
    edges = 10.0 ** (np.arange(n + 1) / bins_per_decade)
    if edges[-1] <= max_count:  # rounding of 10^(i/b) at an exact power
        edges = np.append(edges, 10.0 ** ((n + 1) / bins_per_decade))
    return edges


def word_bins(counts: np.ndarray, edges: np.ndarray, is_word: np.ndarray) -> np.ndarray:
    """Bin index of every dictionary id (``-1``: special symbol or count outside the edges)."""
    counts = np.asarray(counts)
    bins = np.searchsorted(edges, counts, side="right") - 1
    bins[(counts < edges[0]) | (counts >= edges[-1]) | ~np.asarray(is_word)] = -1
    return bins


@dataclass
class FrequencyLoss:
    """Per frequency bin: words, how many occur in the split, their occurrences and accumulated loss."""

    edges: np.ndarray  # [B+1]
    n_words: np.ndarray  # [B] dictionary words in the bin
    n_words_seen: np.ndarray  # [B] of those, words that occur in the split
    n_tokens: np.ndarray  # [B] occurrences in the split
    loss_sum: np.ndarray  # [B] Σ −log p over those occurrences (nats; inf with zero-mass tokens)
    n_zero_mass: np.ndarray  # [B] occurrences with probability 0
    excluded_tokens: int  # split tokens whose word is not binned (special symbols, count 0)
    excluded_loss: float

    @property
    def loss_mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n_tokens > 0, self.loss_sum / np.maximum(self.n_tokens, 1), np.nan)


def frequency_loss(
    train_counts: np.ndarray, is_word: np.ndarray, targets: np.ndarray, losses: np.ndarray, edges: np.ndarray
) -> FrequencyLoss:
    """Bin the words by training count and add up the per-token ``losses`` (−log p) of their occurrences."""
    targets = np.asarray(targets, dtype=np.int64)
    losses = np.asarray(losses, dtype=np.float64)
    if targets.shape != losses.shape:
        raise ValueError(f"targets {targets.shape} and losses {losses.shape} differ")
    n_bins = len(edges) - 1
    bins = word_bins(train_counts, edges, is_word)
    n_words = np.bincount(bins[bins >= 0], minlength=n_bins)
    seen = np.unique(targets)
    seen_bins = bins[seen]
    n_seen = np.bincount(seen_bins[seen_bins >= 0], minlength=n_bins)
    token_bins = bins[targets]
    kept = token_bins >= 0
    finite = np.isfinite(losses)
    n_tokens = np.bincount(token_bins[kept], minlength=n_bins)
    loss_sum = np.bincount(token_bins[kept & finite], weights=losses[kept & finite], minlength=n_bins)
    n_zero = np.bincount(token_bins[kept & ~finite], minlength=n_bins)
    loss_sum[n_zero > 0] = np.inf
    excluded = losses[~kept]
    return FrequencyLoss(
        edges=np.asarray(edges, dtype=np.float64),
        n_words=n_words,
        n_words_seen=n_seen,
        n_tokens=n_tokens,
        loss_sum=loss_sum,
        n_zero_mass=n_zero,
        excluded_tokens=int((~kept).sum()),
        excluded_loss=float(excluded.sum()) if excluded.size else 0.0,
    )


def _bin_label(lo: float, hi: float) -> str:
    return f"[{lo:.4g}, {hi:.4g})"


def plot_frequency_loss(results: Sequence[tuple[str, FrequencyLoss]], path: Path) -> Path:
    """Bars (number of words per frequency bin) coloured by accumulated loss, one panel per model."""
    finite = [v for _, r in results for v in r.loss_sum[np.isfinite(r.loss_sum)]]
    norm = colors.Normalize(vmin=0.0, vmax=max(max(finite, default=1.0), 1e-12))
    cmap = matplotlib.colormaps["viridis"]
    with paper_style():
        fig, axes = new_figure(len(results), sharey=True)
        for ax, (label, r) in zip(axes, results, strict=True):
            lefts, widths = r.edges[:-1], np.diff(r.edges)
            face = [cmap(norm(v)) if np.isfinite(v) else "0.6" for v in r.loss_sum]
            hatch = ["//" if not np.isfinite(v) else "" for v in r.loss_sum]
            bars = ax.bar(lefts, r.n_words, width=widths, align="edge", color=face, edgecolor="black", linewidth=0.4)
            for bar, h in zip(bars, hatch, strict=True):
                bar.set_hatch(h)
            ax.set_xscale("log")
            positive = r.n_words[r.n_words > 0]
            if positive.size and positive.max() > 10 * positive.min():
                ax.set_yscale("log")  # Zipf: a few frequent words, very many rare ones
            ax.set_xlabel("training frequency of the word")
            ax.set_ylabel("number of words")
            ax.set_title(label if np.isfinite(r.loss_sum).all() else f"{label} (hatched: zero-mass tokens, loss ∞)")
        sm = cm.ScalarMappable(norm=norm, cmap=cmap)
        bar = fig.colorbar(sm, ax=axes, fraction=0.05, pad=0.02)
        bar.set_label("accumulated loss Σ −log p (nats)")
        return save_figure(fig, path)


def run(cfg: FrequencyConfig) -> list[Path]:
    """Compute the histogram of each model, write CSV, PNG and JSON under ``cfg.out``."""
    if int(cfg.bins_per_decade) != cfg.bins_per_decade or cfg.bins_per_decade < 1:
        raise KnnlmError(f"--bins-per-decade {cfg.bins_per_decade} must be a positive integer")
    vocab = read_dictionary(resolve_dictionary(cfg.dictionary, cfg.data_bin))
    models: list[ModelTokens] = load_models(
        cfg.caches, cfg.labels, cfg.knobs, vocab, need_knn=True, valid_caches=cfg.valid_caches
    )
    word_counts = np.where(vocab.is_word, vocab.counts, 0)
    edges = log_bins(int(word_counts.max(initial=1)), cfg.bins_per_decade)
    results = []
    for m in models:
        results.append((m.label, frequency_loss(vocab.counts, vocab.is_word, m.cache.targets, -m.interp, edges)))
    out = Path(cfg.out)
    columns = ["model", "count_min", "count_max", "n_words", "n_words_seen", "n_tokens", "loss_sum", "n_zero_mass"]
    rows = [
        [label, edges[b], edges[b + 1], r.n_words[b], r.n_words_seen[b], r.n_tokens[b], r.loss_sum[b], r.n_zero_mass[b]]
        for label, r in results
        for b in range(len(edges) - 1)
    ]
    files = [write_csv(out / f"{NAME}.csv", columns, rows), plot_frequency_loss(results, out / f"{NAME}.png")]
    summary: dict[str, Any] = {
        "analysis": NAME,
        "dictionary": str(vocab.path),
        "knobs": cfg.knobs,
        "bins_per_decade": cfg.bins_per_decade,
        "edges": edges,
        "models": [],
    }
    for m, (_, r) in zip(models, results, strict=True):
        interp = m.interp
        summary["models"].append(
            {
                **m.describe(),
                "lm_ppl": scoring.perplexity(m.lm).ppl,
                "knnlm_ppl": scoring.perplexity(interp).ppl,
                "bins": [
                    {
                        "range": _bin_label(edges[b], edges[b + 1]),
                        "n_words": r.n_words[b],
                        "n_words_seen": r.n_words_seen[b],
                        "n_tokens": r.n_tokens[b],
                        "loss_sum": r.loss_sum[b],
                        "loss_mean": r.loss_mean[b],
                        "n_zero_mass": r.n_zero_mass[b],
                    }
                    for b in range(len(edges) - 1)
                ],
                "excluded_tokens": r.excluded_tokens,
                "excluded_loss": r.excluded_loss,
            }
        )
    files.append(write_json(out / f"{NAME}.json", summary))
    logger.info("frequency/loss histograms: %s", ", ".join(str(f) for f in files))
    return files
