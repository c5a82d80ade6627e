"""Scoring parametric components like kNN retrievals: component-only, interpolated and oracle perplexity.

Result schema (``"schema": "knnlm.component/1"``), one line per (component, split)::

    {"schema": "knnlm.component/1",
     "knobs": {"split", "component", "kind", ... the component's own knobs (key_type, n,
               sizes, components, train_output, loss, k, temperature, ...),
               "lambda": "tune" | float, "lambda_grid": {...}, "checkpoint", "labels": {...}},
     "metrics": {"n_tokens", "lm_ppl", "component_ppl", "component_zero_mass", "interp_ppl",
                 "interp_zero_mass", "oracle_ppl", "lambda_used", "lambda_tuned_on",
                 "tuned_on_reported_split", "valid_interp_ppl"},
     "provenance": {...}}

λ is tuned on the validation cache's component and applied to the reported split.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from knnlm import __version__, scoring
from knnlm.errors import KnnlmError
from knnlm.evaluation.cache import Cache, check_pair
from knnlm.evaluation.components import read_component
from knnlm.evaluation.score import DEFAULT_LAMBDA_GRID, SPLITS, TUNE, interpolation_metrics
from knnlm.io import portable_paths

SCHEMA = "knnlm.component/1"


def score_component(
    cache_valid: Cache,
    cache_test: Cache | None,
    name: str,
    *,
    split: str = "test",
    lam: float | str = TUNE,
    lambda_grid: Sequence[float] = DEFAULT_LAMBDA_GRID,
    labels: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One result line for component ``name`` (present in both caches under the same knobs)."""
    if split not in SPLITS:
        raise KnnlmError(f"--split must be one of {SPLITS}, got {split!r}")
    if split == "test" and cache_test is None:
        raise KnnlmError("reporting on test needs --test-cache (λ is tuned on --valid-cache)")
    check_pair(cache_valid, cache_test)
    valid_comp, valid_meta = read_component(cache_valid, name)
    valid_lm = np.asarray(cache_valid.lm_logprob, dtype=np.float64)
    if split == "test":
        assert cache_test is not None
        comp, meta = read_component(cache_test, name)
        if meta["knobs"] != valid_meta["knobs"]:
            raise KnnlmError(
                f"component {name!r} differs between the caches ({valid_meta['knobs']} vs {meta['knobs']}); "
                f"compute both from the same model"
            )
        lm, cache = np.asarray(cache_test.lm_logprob, dtype=np.float64), cache_test
    else:
        comp, meta, lm, cache = valid_comp, valid_meta, valid_lm, cache_valid
    grid = tuple(float(g) for g in lambda_grid)
    used = scoring.tune_lambda(valid_lm, valid_comp, grid) if lam == TUNE else float(lam)
    metrics = interpolation_metrics("component", lm, comp, valid_lm, valid_comp, used, lam, split)
    knobs = {
        "split": split,
        "component": name,
        **meta["knobs"],
        "lambda": lam,
        "lambda_grid": {"min": min(grid), "max": max(grid), "n": len(grid)},
        "checkpoint": cache.checkpoint_fingerprint,
        "labels": dict(labels or {}),
    }
    provenance = portable_paths({
        "component_source": meta["source"],
        "valid_cache": str(cache_valid.path.absolute()),
        "test_cache": str(cache_test.path.absolute()) if (cache_test is not None and split == "test") else None,
        "knnlm_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    return {"schema": SCHEMA, "knobs": knobs, "metrics": metrics, "provenance": provenance}
