"""Location in the context window (Xu et al. 2023, Appendix E.3): perplexity by target position.

Tokens are bucketed by ``positions.npy`` (the target's position inside the window
the LM saw, 0-based) into buckets of ``bucket_size`` positions, and the perplexity
of the LM and of the kNN-LM is computed per bucket. Tokens early in a window have
little context, so the LM is weaker there; the question is whether retrieval helps
more there than late in the window.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from knnlm import scoring
from knnlm.errors import KnnlmError
from knnlm.evaluation.cache import Cache

from .inputs import ModelsConfig, load_models
from .outputs import write_csv, write_json
from .plots import PAIR_COLOURS, new_figure, paper_style, save_figure
from .vocab import read_dictionary, resolve_dictionary

logger = logging.getLogger(__name__)

NAME = "position"


@dataclass(kw_only=True)
class PositionConfig(ModelsConfig):
    """``knnlm analyze position``: the options (defaults shared with configs/analyze/position.yaml)."""

    bucket_size: int = 32  # positions per bucket


@dataclass
class PositionPerplexity:
    """Per bucket of positions ``[start, start + size)``: tokens and the perplexity of each series."""

    starts: np.ndarray  # [B]
    size: int
    n_tokens: np.ndarray  # [B]
    ppl: dict[str, np.ndarray]  # series -> [B] (inf with zero-mass tokens, NaN for empty buckets)


def position_perplexity(
    positions: np.ndarray, logprobs: Mapping[str, np.ndarray], bucket_size: int
) -> PositionPerplexity:
    """Bucket tokens by position and compute ``exp(−mean log p)`` per bucket for each series."""
    if bucket_size < 1:
        raise ValueError(f"bucket size must be at least 1, got {bucket_size}")
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size and positions.min() < 0:
        raise ValueError("positions must be >= 0")
    bucket = positions // bucket_size
    n_buckets = int(bucket.max(initial=-1)) + 1
    n_tokens = np.bincount(bucket, minlength=n_buckets)
    ppl = {}
    for name, lp in logprobs.items():
        lp = np.asarray(lp, dtype=np.float64)
        if lp.shape != positions.shape:
            raise ValueError(f"{name}: log-probs {lp.shape} and positions {positions.shape} differ")
        values = np.full(n_buckets, np.nan)
        for b in np.flatnonzero(n_tokens):
            values[b] = scoring.perplexity(lp[bucket == b]).ppl
        ppl[name] = values
    return PositionPerplexity(np.arange(n_buckets) * bucket_size, bucket_size, n_tokens, ppl)


def open_positions(cache: Cache) -> np.ndarray:
    """The cache's ``positions.npy`` (int [T]), checked."""
    path = cache.path / "positions.npy"
    if not path.is_file():
        raise KnnlmError(f"{path} is missing: re-run the dump with target positions saved")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise KnnlmError(f"{path} is not a readable .npy file ({err}); re-run the dump") from err
    if arr.shape != (cache.n_tokens,) or arr.dtype.kind not in "iu":
        raise KnnlmError(f"{path} must be integers [{cache.n_tokens}], found {arr.dtype} {arr.shape}; re-run the dump")
    return arr


def plot_position(results: Mapping[str, PositionPerplexity], path: Path) -> Path:
    """Perplexity per position bucket: LM dashed, kNN-LM solid, one colour per model."""
    with paper_style():
        fig, (ax,) = new_figure(1)
        for colour, (label, r) in zip(PAIR_COLOURS, results.items(), strict=False):
            x = r.starts + (r.size - 1) / 2.0
            shown = r.n_tokens > 0
            ax.plot(x[shown], r.ppl["lm"][shown], linestyle="--", marker="o", color=colour, label=f"{label}: LM")
            ax.plot(x[shown], r.ppl["knnlm"][shown], linestyle="-", marker="s", color=colour, label=f"{label}: kNN-LM")
        ax.set_xlabel("target position in the context window")
        ax.set_ylabel("perplexity")
        ax.legend(frameon=False)
        return save_figure(fig, path)


def run(cfg: PositionConfig) -> list[Path]:
    """Per-bucket perplexities for each model; write CSV, PNG and JSON under ``cfg.out``."""
    if cfg.bucket_size < 1:
        raise KnnlmError(f"--bucket-size {cfg.bucket_size} must be at least 1")
    vocab = (
        read_dictionary(resolve_dictionary(cfg.dictionary, cfg.data_bin)) if (cfg.dictionary or cfg.data_bin) else None
    )
    models = load_models(cfg.caches, cfg.labels, cfg.knobs, vocab, need_knn=True, valid_caches=cfg.valid_caches)
    results = {
        m.label: position_perplexity(open_positions(m.cache), {"lm": m.lm, "knnlm": m.interp}, cfg.bucket_size)
        for m in models
    }
    out = Path(cfg.out)
    rows = [
        [label, int(s), int(s) + r.size - 1, int(n), r.ppl["lm"][b], r.ppl["knnlm"][b]]
        for label, r in results.items()
        for b, (s, n) in enumerate(zip(r.starts, r.n_tokens, strict=True))
    ]
    files = [
        write_csv(
            out / f"{NAME}.csv", ["model", "position_min", "position_max", "n_tokens", "lm_ppl", "knnlm_ppl"], rows
        ),
        plot_position(results, out / f"{NAME}.png"),
    ]
    summary = {
        "analysis": NAME,
        "knobs": cfg.knobs,
        "bucket_size": cfg.bucket_size,
        "models": [
            {
                **m.describe(),
                "lm_ppl": scoring.perplexity(m.lm).ppl,
                "knnlm_ppl": scoring.perplexity(m.interp).ppl,
                "buckets": [
                    {
                        "start": r.starts[b],
                        "n_tokens": r.n_tokens[b],
                        "lm_ppl": r.ppl["lm"][b],
                        "knnlm_ppl": r.ppl["knnlm"][b],
                    }
                    for b in range(len(r.starts))
                ],
            }
            for m, r in zip(models, results.values(), strict=True)
        ],
    }
    files.append(write_json(out / f"{NAME}.json", summary))
    logger.info("position in the context window: %s", ", ".join(str(f) for f in files))
    return files
