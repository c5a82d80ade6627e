"""The score phase: from two cached splits to one JSON-able result per kNN-LM setting.

λ is tuned on the validation cache and applied to the split the result reports
(test unless asked otherwise); the test cache is never used for tuning. A whole
grid of settings is computed from one pass per (split, retrieval, subsample): the
kNN log-probabilities for every (k, τ) at once, then λ per setting, which is cheap.

Result schema (``"schema": "knnlm.score/1"``); ``inf`` is written as the string
``"inf"`` so that every line is strict JSON::

    {"schema": "knnlm.score/1",
     "knobs": {"split", "key_type", "similarity", "k", "temperature",
               "lambda": "tune" | float, "lambda_grid": {"min", "max", "n"},
               "mask_source", "score_source", "subsample_ratio", "subsample_seed" (null at ratio 1),
               "subsample_method": "none" | "score_time_filter" | "datastore_rebuild"
                                   | "datastore_rebuild+score_time_filter",
               "datastore_subsample", "datastore_fraction", "datastore_size", "index",
               "checkpoint", "labels": {...}},
     "metrics": {"n_tokens", "lm_ppl", "knn_ppl", "knn_zero_mass", "interp_ppl",
                 "interp_zero_mass", "oracle_ppl", "lambda_used", "lambda_tuned_on": "valid" | null,
                 "tuned_on_reported_split", "valid_interp_ppl", "neighbours_used_mean",
                 "tokens_short_of_k",
                 where the cache's tokens are sub-word pieces of the dataset's words (``--hf-model``):
                 "n_words", "lm_word_ppl", "knn_word_ppl", "interp_word_ppl", "oracle_word_ppl",
                 "token_unit"; every other ``*_ppl`` is per token},
     "provenance": {"retrieval", "valid_cache", "test_cache", "datastore_path",
                    "knnlm_version", "created"}}
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from knnlm import __version__, scoring
from knnlm.errors import KnnlmError
from knnlm.evaluation.cache import KEY_TYPES, SIMILARITIES, SOURCES, Cache, check_pair, check_retrieval_pair
from knnlm.io import portable_paths

logger = logging.getLogger(__name__)

SCHEMA = "knnlm.score/1"
SPLITS = ("valid", "test")
TUNE = "tune"
DEFAULT_LAMBDA_GRID: tuple[float, ...] = tuple(float(x) for x in scoring.DEFAULT_LAMBDA_GRID)


def _round(x: float) -> float:
    """Drop float noise from ranges (0.30000000000000004 → 0.3) so equal knobs compare equal."""
    return float(round(float(x), 10))


@dataclass(frozen=True)
class ScoreSetting:
    """Every knob of one kNN-LM evaluation; ``lam="tune"`` tunes λ on the validation cache."""

    key_type: str = "att"
    similarity: str = "l2"
    k: int = 1024
    temperature: float = 1.0
    lam: float | str = TUNE
    mask_source: str = "faiss"
    score_source: str = "faiss"
    subsample_ratio: float = 1.0
    subsample_seed: int = 0
    split: str = "test"
    lambda_grid: tuple[float, ...] = field(default=DEFAULT_LAMBDA_GRID, repr=False)

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("key type", self.key_type, KEY_TYPES),
            ("similarity", self.similarity, SIMILARITIES),
            ("mask source", self.mask_source, SOURCES),
            ("score source", self.score_source, SOURCES),
            ("split", self.split, SPLITS),
        ):
            if value not in allowed:
                raise KnnlmError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        if int(self.k) != self.k or self.k < 1:
            raise KnnlmError(f"--k must be a positive integer, got {self.k}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise KnnlmError(f"--temperature must be > 0, got {self.temperature}")
        if self.lam != TUNE and not (isinstance(self.lam, int | float) and 0.0 <= self.lam <= 1.0):
            raise KnnlmError(f"--lambda must be 'tune' or a number in [0, 1], got {self.lam!r}")
        if not (0.0 < self.subsample_ratio <= 1.0):
            raise KnnlmError(f"--subsample-ratio must be in (0, 1], got {self.subsample_ratio}")
        if int(self.subsample_seed) != self.subsample_seed or self.subsample_seed < 0:
            raise KnnlmError(f"--subsample-seed must be an integer >= 0, got {self.subsample_seed}")
        grid = self.lambda_grid
        if not grid or any(not (0.0 <= g <= 1.0) for g in grid):
            raise KnnlmError("--lambda-grid must be a non-empty list of values in [0, 1]")
        object.__setattr__(self, "k", int(self.k))
        object.__setattr__(self, "temperature", _round(self.temperature))
        object.__setattr__(self, "subsample_ratio", _round(self.subsample_ratio))
        # the seed means nothing without subsampling: normalize it so equal settings compare equal
        object.__setattr__(self, "subsample_seed", int(self.subsample_seed) if self.subsample_ratio < 1 else 0)
        object.__setattr__(self, "lambda_grid", tuple(_round(g) for g in grid))
        if self.lam != TUNE:
            object.__setattr__(self, "lam", _round(self.lam))

    @property
    def retrieval_knobs(self) -> tuple[str, str, str, str]:
        return (self.key_type, self.similarity, self.mask_source, self.score_source)

    @property
    def subsample(self) -> scoring.Subsample | None:
        if self.subsample_ratio >= 1.0:
            return None
        return scoring.Subsample(self.subsample_ratio, self.subsample_seed)


def json_number(value: float) -> float | str:
    """A float for a JSON line: infinities become ``"inf"``/``"-inf"`` (strict JSON has none)."""
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if math.isnan(value):
        raise ValueError("NaN in a result")
    return float(value)


def _ppl_fields(prefix: str, logprobs: np.ndarray) -> dict[str, Any]:
    result = scoring.perplexity(logprobs)
    return {f"{prefix}_ppl": json_number(result.ppl), f"{prefix}_zero_mass": result.n_zero_mass}


def _word_ppl_fields(n_words: int, parts: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Per-word perplexity, exp(total NLL / words): the pieces of a word multiply into its probability."""
    out: dict[str, Any] = {"n_words": n_words}
    for prefix, logprobs in parts.items():
        result = scoring.perplexity(logprobs)  # checks NaN and counts zero-mass tokens
        nll = math.inf if result.n_zero_mass else -float(np.sum(np.asarray(logprobs, dtype=np.float64)))
        mean = nll / n_words
        out[f"{prefix}_word_ppl"] = json_number(math.exp(mean) if mean < 700 else math.inf)
    return out


def interpolation_metrics(
    part: str,
    lm: np.ndarray,
    other: np.ndarray,
    valid_lm: np.ndarray,
    valid_other: np.ndarray,
    lam_used: float,
    lam_asked: float | str,
    split: str,
    units: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The metrics of a result line: the LM, the ``part`` alone (``knn`` or ``component``), their
    interpolation at ``lam_used`` and the oracle, on the reported split; the interpolation on valid;
    per-word perplexities where ``units`` says tokens are pieces of words. Score lines and component
    lines both come from here."""
    interp = scoring.interpolate(lm, other, lam_used)
    oracle = scoring.oracle_logprob(lm, other)
    metrics: dict[str, Any] = {"n_tokens": int(lm.size)}
    metrics.update(_ppl_fields("lm", lm))
    metrics.update(_ppl_fields(part, other))
    metrics.update(_ppl_fields("interp", interp))
    del metrics["lm_zero_mass"]
    metrics["oracle_ppl"] = json_number(scoring.perplexity(oracle).ppl)
    metrics.update(
        lambda_used=lam_used,
        lambda_tuned_on="valid" if lam_asked == TUNE else None,
        tuned_on_reported_split=lam_asked == TUNE and split == "valid",
        valid_interp_ppl=json_number(scoring.perplexity(scoring.interpolate(valid_lm, valid_other, lam_used)).ppl),
    )
    if units and units.get("n_words"):
        parts = {"lm": lm, part: other, "interp": interp, "oracle": oracle}
        metrics.update(_word_ppl_fields(int(units["n_words"]), parts))
        metrics["token_unit"] = units.get("token")
    return metrics


def _subsample_method(datastore_subsample: float, ratio: float) -> str:
    parts = []
    if datastore_subsample < 1.0:
        parts.append("datastore_rebuild")
    if ratio < 1.0:
        parts.append("score_time_filter")
    return "+".join(parts) or "none"


@dataclass
class _SplitData:
    """One split of one retrieval group: LM log-probs, kNN log-probs for every (k, τ), neighbours kept."""

    lm: np.ndarray  # [T]
    knn: np.ndarray  # [n_k, n_tau, T]
    used: dict[int, np.ndarray]  # k -> [T]


def _load_group(
    cache: Cache,
    settings: Sequence[ScoreSetting],
    ks: list[int],
    taus: list[float],
    chunk_rows: int,
) -> _SplitData:
    first = settings[0]
    retrieval = cache.find(*first.retrieval_knobs)
    if max(ks) > retrieval.info.k_max:
        raise KnnlmError(
            f"k={max(ks)} exceeds k_max={retrieval.info.k_max} of {retrieval.path}; lower --k or re-run the "
            f"dump with a larger k_max"
        )
    subsample = first.subsample
    ids = retrieval.ids if subsample is not None else None
    used = np.empty((len(ks), cache.n_tokens), dtype=np.int64)
    knn = scoring.knn_logprob_grid(
        retrieval.scores,
        retrieval.vals,
        cache.targets,
        ks,
        taus,
        ids=ids,
        subsample=subsample,
        chunk_rows=chunk_rows,
        used_out=used,
    )
    return _SplitData(np.asarray(cache.lm_logprob, dtype=np.float64), knn, dict(zip(ks, used, strict=True)))


def _group_key(setting: ScoreSetting) -> tuple[Any, ...]:
    return (*setting.retrieval_knobs, setting.subsample_ratio, setting.subsample_seed)


def check_settings(
    cache_valid: Cache, cache_test: Cache | None, settings: Iterable[ScoreSetting]
) -> tuple[list[ScoreSetting], list[tuple[ScoreSetting, str]]]:
    """Split ``settings`` into those the caches can serve and (setting, reason) for the others."""
    ok, missing = [], []
    for s in settings:
        caches = [cache_valid] + ([cache_test] if s.split == "test" else [])
        if s.split == "test" and cache_test is None:
            missing.append((s, "split 'test' needs --test-cache"))
            continue
        lacking = [c for c in caches if c is not None and not c.has(*s.retrieval_knobs)]
        if lacking:
            where = ", ".join(str(c.path) for c in lacking)
            missing.append((s, f"no {'/'.join(s.retrieval_knobs)} retrieval in {where}"))
            continue
        ok.append(s)
    return ok, missing


def score_grid(
    cache_valid: Cache,
    cache_test: Cache | None,
    settings: Sequence[ScoreSetting],
    *,
    labels: Mapping[str, Any] | None = None,
    chunk_rows: int = scoring.DEFAULT_CHUNK_ROWS,
) -> Iterator[dict[str, Any]]:
    """Score many settings, yielding one result dict per setting as soon as its group is done.

    Settings sharing a retrieval and a subsample are one group: the kNN log-probs
    for all their (k, τ) are computed in one pass over each split. Results come out
    group by group, in input order within a group.
    """
    check_pair(cache_valid, cache_test if any(s.split == "test" for s in settings) else None)
    _, missing = check_settings(cache_valid, cache_test, settings)
    if missing:
        setting, reason = missing[0]
        raise KnnlmError(f"cannot score {setting}: {reason}")
    groups: dict[tuple[Any, ...], list[ScoreSetting]] = {}
    for s in settings:
        groups.setdefault(_group_key(s), []).append(s)
    for n, group in enumerate(groups.values(), 1):
        ks = sorted({s.k for s in group})
        taus = sorted({s.temperature for s in group})
        start = time.perf_counter()
        if any(s.split == "test" for s in group):
            assert cache_test is not None
            check_retrieval_pair(
                cache_valid.find(*group[0].retrieval_knobs), cache_test.find(*group[0].retrieval_knobs)
            )
        valid = _load_group(cache_valid, group, ks, taus, chunk_rows)
        test = None
        if any(s.split == "test" for s in group):
            test = _load_group(cache_test, group, ks, taus, chunk_rows)
        logger.info(
            "group %d/%d (%s, subsample %s): %d k x %d τ over %s tokens in %.1f s",
            n,
            len(groups),
            "/".join(group[0].retrieval_knobs),
            group[0].subsample_ratio,
            len(ks),
            len(taus),
            f"{cache_valid.n_tokens + (test.lm.size if test is not None else 0):,}",
            time.perf_counter() - start,
        )
        tuned: dict[tuple[int, float, tuple[float, ...]], float] = {}
        for s in group:
            ki, ti = ks.index(s.k), taus.index(s.temperature)
            yield _result(cache_valid, cache_test, s, valid, test, ki, ti, tuned, labels)


def _result(
    cache_valid: Cache,
    cache_test: Cache | None,
    s: ScoreSetting,
    valid: _SplitData,
    test: _SplitData | None,
    ki: int,
    ti: int,
    tuned: dict[tuple[int, float, tuple[float, ...]], float],
    labels: Mapping[str, Any] | None,
) -> dict[str, Any]:
    valid_knn = valid.knn[ki, ti]
    if s.lam == TUNE:
        key = (s.k, s.temperature, s.lambda_grid)
        if key not in tuned:
            tuned[key] = scoring.tune_lambda(valid.lm, valid_knn, s.lambda_grid)
        lam = tuned[key]
    else:
        lam = float(s.lam)
    reported = test if s.split == "test" else valid
    assert reported is not None
    cache = cache_test if s.split == "test" else cache_valid
    assert cache is not None
    knn = reported.knn[ki, ti]
    used = reported.used[s.k]
    retrieval = cache.find(*s.retrieval_knobs)
    info = retrieval.info
    ds_sub = info.datastore_subsample
    metrics = interpolation_metrics("knn", reported.lm, knn, valid.lm, valid_knn, lam, s.lam, s.split,
                                    cache.meta.get("units"))
    metrics.update(neighbours_used_mean=float(used.mean()), tokens_short_of_k=int(np.count_nonzero(used < s.k)))
    knobs = {
        "split": s.split,
        "key_type": s.key_type,
        "similarity": s.similarity,
        "k": s.k,
        "temperature": s.temperature,
        "lambda": s.lam,
        "lambda_grid": {"min": min(s.lambda_grid), "max": max(s.lambda_grid), "n": len(s.lambda_grid)},
        "mask_source": s.mask_source,
        "score_source": s.score_source,
        "subsample_ratio": s.subsample_ratio,
        "subsample_seed": s.subsample_seed if s.subsample_ratio < 1.0 else None,
        "subsample_method": _subsample_method(ds_sub, s.subsample_ratio),
        "datastore_subsample": ds_sub,
        "datastore_fraction": _round(ds_sub * s.subsample_ratio),
        "datastore_size": info.datastore.get("size"),
        "index": portable_paths(info.index),
        "checkpoint": cache.checkpoint_fingerprint,
        "labels": dict(labels or {}),
    }
    provenance = portable_paths({
        "retrieval": info.name,
        "valid_cache": str(cache_valid.path.absolute()),
        "test_cache": str(cache_test.path.absolute()) if (cache_test is not None and s.split == "test") else None,
        "datastore_path": info.datastore.get("path"),
        "knnlm_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    return {"schema": SCHEMA, "knobs": knobs, "metrics": metrics, "provenance": provenance}


def score(cache_valid: Cache, cache_test: Cache | None, setting: ScoreSetting) -> dict[str, Any]:
    """Score one setting: base LM, kNN-only, interpolated and oracle perplexities (see the schema)."""
    return next(score_grid(cache_valid, cache_test, [setting]))


def expand_grid(
    *,
    key_type: Sequence[str] = ("att",),
    similarity: Sequence[str] = ("l2",),
    k: Sequence[int] = (1024,),
    temperature: Sequence[float] = (1.0,),
    lam: Sequence[float | str] = (TUNE,),
    mask_source: Sequence[str] = ("faiss",),
    score_source: Sequence[str] = ("faiss",),
    subsample_ratio: Sequence[float] = (1.0,),
    subsample_seed: Sequence[int] = (0,),
    split: str = "test",
    lambda_grid: Sequence[float] = DEFAULT_LAMBDA_GRID,
) -> list[ScoreSetting]:
    """The Cartesian product of knob lists as settings (duplicates removed, order kept)."""
    out: dict[ScoreSetting, None] = {}
    combos = itertools.product(
        key_type, similarity, mask_source, score_source, subsample_ratio, subsample_seed, k, temperature, lam
    )
    for kt, sim, ms, ss, ratio, seed, kk, tau, lm in combos:
        setting = ScoreSetting(
            key_type=kt,
            similarity=sim,
            k=kk,
            temperature=tau,
            lam=lm,
            mask_source=ms,
            score_source=ss,
            subsample_ratio=ratio,
            subsample_seed=seed,
            split=split,
            lambda_grid=tuple(lambda_grid),
        )
        out[setting] = None  # settings equal after normalization (e.g. seeds at ratio 1) collapse
    return list(out)
