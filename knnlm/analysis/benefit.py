"""Which tokens benefit from approximate search (Xu et al. 2023, Appendix D).

For every word type with at least ``min_count`` occurrences in the split, the share
of its occurrences where the kNN distribution gives the target more probability
than the LM (``log p_kNN > log p_LM``), once with FAISS's approximate neighbours
(FAISS mask) and once with the exact ones (real mask), both retrievals of one
cache. The shares are set against the word's length in characters and its forward
and backward bigram entropy in the training stream (how many different words
follow / precede it), with least-squares lines and Pearson/Spearman correlations.
fairseq's special symbols (``</s>``, ``<unk>``, …) are left out: they have no length.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from knnlm.errors import KnnlmError
from knnlm.evaluation.cache import Cache

from .inputs import KnnKnobs, knn_logprobs, open_retrieval
from .outputs import write_csv, write_json
from .plots import PAIR_COLOURS, new_figure, paper_style, save_figure
from .stats import Trend, bigram_entropy, trend
from .vocab import (
    Vocabulary,
    check_cache_vocabulary,
    read_binarized_stream,
    read_dictionary,
    read_text_stream,
    resolve_dictionary,
    word_length,
)

logger = logging.getLogger(__name__)

NAME = "benefit"
CONDITIONS = ("faiss", "real")
CONDITION_LABELS = {"faiss": "FAISS mask", "real": "real mask", "difference": "FAISS − real"}
FEATURES = {
    "length": "word length (characters)",
    "forward_entropy": "forward bigram entropy (nats)",
    "backward_entropy": "backward bigram entropy (nats)",
}


@dataclass(kw_only=True)
class BenefitConfig:
    """``knnlm analyze benefit``: the options (defaults shared with configs/analyze/benefit.yaml)."""

    out: str | Path
    cache: str | Path
    dictionary: str | Path | None = None  # dict.txt (default: <data_bin>/dict.txt)
    data_bin: str | Path | None = None  # its <train_split>.bin/.idx is the training stream for the entropies
    text: str | Path | None = None  # or a tokenized training text file (one line per sentence/paragraph)
    train_split: str = "train"
    faiss_retrieval: str | None = None  # default: the cache's <key_type>-<similarity> FAISS-mask retrieval
    real_retrieval: str | None = None  # default: the cache's <key_type>-<similarity> exact retrieval
    key_type: str = "att"
    similarity: str = "l2"
    k: int = 1024
    temperature: float = 1.0
    min_count: int = 10


@dataclass
class WordShares:
    """Per word type (≥ ``min_count`` occurrences): its id, occurrences and share of kNN wins per condition."""

    words: np.ndarray  # [W] ids
    occurrences: np.ndarray  # [W]
    shares: dict[str, np.ndarray]  # condition -> [W] in [0, 1]


def knn_win_shares(
    targets: np.ndarray,
    lm_logprob: np.ndarray,
    knn_logprob: Mapping[str, np.ndarray],
    min_count: int,
    is_word: np.ndarray | None = None,
) -> WordShares:
    """Share of each word's occurrences where the kNN log-prob beats the LM one, per condition."""
    targets = np.asarray(targets, dtype=np.int64)
    lm = np.asarray(lm_logprob, dtype=np.float64)
    size = int(targets.max(initial=0)) + 1 if is_word is None else len(is_word)
    occurrences = np.bincount(targets, minlength=size)
    keep = occurrences >= min_count
    if is_word is not None:
        keep &= np.asarray(is_word, dtype=bool)
    words = np.flatnonzero(keep)
    shares = {}
    for name, knn in knn_logprob.items():
        wins = np.bincount(targets, weights=(np.asarray(knn, dtype=np.float64) > lm).astype(np.float64), minlength=size)
        shares[name] = wins[words] / occurrences[words]
    return WordShares(words, occurrences[words], shares)


def _stream(cfg: BenefitConfig, vocab: Vocabulary) -> tuple[np.ndarray, str]:
    if cfg.text:
        return read_text_stream(cfg.text, vocab), str(cfg.text)
    if cfg.data_bin:
        prefix = Path(cfg.data_bin) / cfg.train_split
        return read_binarized_stream(prefix, vocab), str(prefix)
    raise KnnlmError("bigram entropies need the training stream: pass --data-bin DIR (its train split) or --text FILE")


def plot_benefit(
    features: Mapping[str, np.ndarray], shares: WordShares, trends: Mapping[str, Mapping[str, Trend]], path: Path
) -> Path:
    """Scatter of the kNN win share against each feature, FAISS vs real mask, with least-squares lines."""
    with paper_style():
        fig, axes = new_figure(len(features), height=2.6)
        for ax, (feature, values) in zip(axes, features.items(), strict=True):
            for colour, (cond, share) in zip(PAIR_COLOURS, shares.shares.items(), strict=False):
                t = trends[cond][feature]
                ax.scatter(values, share, s=4, alpha=0.35, color=colour, linewidths=0)
                r_text = "n/a" if np.isnan(t.pearson_r) else f"{t.pearson_r:+.2f}"
                label = f"{CONDITION_LABELS[cond]} (r={r_text})"
                finite = values[np.isfinite(values)]
                if np.isfinite(t.slope) and finite.size:
                    xs = np.array([finite.min(), finite.max()])
                    ax.plot(xs, t.slope * xs + t.intercept, color=colour, label=label)
                else:
                    ax.plot([], [], color=colour, label=label)
            ax.set_xlabel(FEATURES[feature])
            ax.set_ylabel("share of occurrences kNN > LM")
            ax.set_ylim(-0.02, 1.02)
            ax.legend(frameon=False, loc="best")
        return save_figure(fig, path)


def run(cfg: BenefitConfig) -> list[Path]:
    """Compute the per-word shares and their trends; write CSV (per word), PNG and JSON under ``cfg.out``."""
    if cfg.min_count < 1:
        raise KnnlmError(f"--min-count {cfg.min_count} must be at least 1")
    vocab = read_dictionary(resolve_dictionary(cfg.dictionary, cfg.data_bin))
    cache = Cache(cfg.cache)
    check_cache_vocabulary(cache.path, cache.dict_size, cache.dictionary_fingerprint, vocab)
    knn, retrievals = {}, {}
    for cond, name in (("faiss", cfg.faiss_retrieval), ("real", cfg.real_retrieval)):
        knobs = KnnKnobs(
            retrieval=name,
            key_type=cfg.key_type,
            similarity=cfg.similarity,
            mask_source=cond,
            score_source=cond,
            k=cfg.k,
            temperature=cfg.temperature,
            lam=0.0,
        )
        knobs.check()
        retrieval = open_retrieval(cache, knobs)
        if retrieval.info.mask_source != cond:
            raise KnnlmError(
                f"retrieval {retrieval.info.name!r} of {cache.path} has a {retrieval.info.mask_source} mask; "
                f"pass a {cond}-mask retrieval as --{cond}-retrieval"
            )
        retrievals[cond] = retrieval.info.name
        knn[cond] = knn_logprobs(cache, retrieval, cfg.k, cfg.temperature)
    lm = np.asarray(cache.lm_logprob, dtype=np.float64)
    shares = knn_win_shares(cache.targets, lm, knn, cfg.min_count, vocab.is_word)
    if shares.words.size == 0:
        raise KnnlmError(f"no word occurs {cfg.min_count} times in {cache.path}; lower --min-count")
    shares.shares["difference"] = shares.shares["faiss"] - shares.shares["real"]
    stream, stream_source = _stream(cfg, vocab)
    entropy = bigram_entropy(stream, len(vocab))
    features = {
        "length": np.array([word_length(vocab.symbols[int(w)]) for w in shares.words], dtype=np.float64),
        "forward_entropy": entropy.forward[shares.words],
        "backward_entropy": entropy.backward[shares.words],
    }
    trends = {cond: {f: trend(x, share) for f, x in features.items()} for cond, share in shares.shares.items()}
    out = Path(cfg.out)
    rows = [
        [
            int(w),
            vocab.symbols[int(w)],
            int(n),
            int(entropy.counts[w]),
            *(features[f][i] for f in features),
            *(shares.shares[c][i] for c in shares.shares),
        ]
        for i, (w, n) in enumerate(zip(shares.words, shares.occurrences, strict=True))
    ]
    columns = ["id", "word", "occurrences", "train_count", *features, *(f"share_{c}" for c in shares.shares)]
    plotted = WordShares(shares.words, shares.occurrences, {c: shares.shares[c] for c in CONDITIONS})
    files = [
        write_csv(out / f"{NAME}.csv", columns, rows),
        plot_benefit(features, plotted, trends, out / f"{NAME}.png"),
    ]
    summary: dict[str, Any] = {
        "analysis": NAME,
        "cache": str(cache.path),
        "split": cache.split,
        "checkpoint": cache.checkpoint_fingerprint,
        "dictionary": str(vocab.path),
        "training_stream": stream_source,
        "training_tokens": int(len(stream)),
        "retrievals": retrievals,
        "settings": {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("out", "cache")},
        "n_words": int(shares.words.size),
        "mean_share": {c: float(np.mean(s)) for c, s in shares.shares.items()},
        "trends": trends,
    }
    files.append(write_json(out / f"{NAME}.json", summary))
    logger.info("which tokens benefit: %s", ", ".join(str(f) for f in files))
    return files
