"""Per-token log-probabilities of the models an analysis compares, read from their caches.

Each compared model is one cache folder (of the same split) plus a label. The kNN
part is computed with :mod:`knnlm.scoring` from one retrieval of the cache, picked
by name or by its knobs (key type, similarity, mask source, score source), with
``k`` and ``τ``; λ is a number or ``tune``, which tunes it on a *validation* cache
of the same model (never on the split that is analysed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from knnlm import scoring
from knnlm.errors import KnnlmError
from knnlm.evaluation.cache import KEY_TYPES, SIMILARITIES, SOURCES, Cache, Retrieval, check_retrieval_pair
from knnlm.evaluation.score import TUNE

from .vocab import Vocabulary, check_cache_vocabulary


@dataclass(kw_only=True)
class KnnKnobs:
    """How the kNN-LM log-probability of each token is computed (the defaults of every analysis)."""

    retrieval: str | None = None  # a retrieval folder name of the cache; overrides the four knobs below
    key_type: str = "att"
    similarity: str = "l2"
    mask_source: str = "faiss"
    score_source: str = "faiss"
    k: int = 1024
    temperature: float = 1.0
    lam: float | str = 0.25  # a number in [0, 1], or "tune" (needs valid_caches)

    @property
    def knobs(self) -> KnnKnobs:
        """The kNN knobs alone (for recording them next to the results of a config that extends them)."""
        return KnnKnobs(**{f.name: getattr(self, f.name) for f in fields(KnnKnobs)})

    def check(self) -> None:
        """Raise a :class:`KnnlmError` naming the option that is out of range."""
        for name, value, allowed in (
            ("key-type", self.key_type, KEY_TYPES),
            ("similarity", self.similarity, SIMILARITIES),
            ("mask-source", self.mask_source, SOURCES),
            ("score-source", self.score_source, SOURCES),
        ):
            if value not in allowed:
                raise KnnlmError(f"--{name} {value!r} must be one of {', '.join(allowed)}")
        if int(self.k) != self.k or self.k < 1:
            raise KnnlmError(f"--k {self.k} must be a positive integer")
        if not (float(self.temperature) > 0 and math.isfinite(float(self.temperature))):
            raise KnnlmError(f"--temperature {self.temperature} must be a finite number > 0")
        if self.lam != TUNE:
            try:
                lam = float(self.lam)
            except (TypeError, ValueError):
                raise KnnlmError(f"--lambda {self.lam!r} must be a number in [0, 1] or 'tune'") from None
            if not 0.0 <= lam <= 1.0:
                raise KnnlmError(f"--lambda {self.lam} must be in [0, 1] (or 'tune')")


@dataclass
class ModelTokens:
    """One compared model on one split: its cache and per-token log-probs (float64 [T], natural log)."""

    label: str
    cache: Cache
    lm: np.ndarray
    knn: np.ndarray | None  # None when no retrieval was needed
    lam: float
    retrieval: str | None

    @property
    def interp(self) -> np.ndarray:
        """log((1 - λ)·p_LM + λ·p_kNN) of each token (the LM's own log-probs when no kNN part)."""
        if self.knn is None:
            return self.lm
        return scoring.interpolate(self.lm, self.knn, self.lam)

    def describe(self) -> dict[str, Any]:
        """The inputs behind these numbers, for the JSON output."""
        return {
            "label": self.label,
            "cache": str(self.cache.path),
            "split": self.cache.split,
            "n_tokens": self.cache.n_tokens,
            "checkpoint": self.cache.checkpoint_fingerprint,
            "retrieval": self.retrieval,
            "lambda_used": self.lam if self.knn is not None else None,
        }


def open_retrieval(cache: Cache, knobs: KnnKnobs) -> Retrieval:
    """The retrieval ``knobs`` names, with ``k`` checked against its ``k_max``."""
    if knobs.retrieval:
        retrieval = cache.retrieval(knobs.retrieval)
    else:
        retrieval = cache.find(knobs.key_type, knobs.similarity, knobs.mask_source, knobs.score_source)
    if knobs.k > retrieval.info.k_max:
        raise KnnlmError(
            f"--k {knobs.k} exceeds k_max={retrieval.info.k_max} of {retrieval.path}; lower --k or re-run the "
            f"dump with a larger k_max"
        )
    return retrieval


def knn_logprobs(cache: Cache, retrieval: Retrieval, k: int, temperature: float) -> np.ndarray:
    """kNN log-prob of each target of ``cache`` from ``retrieval`` (``-inf``: no neighbour carries it)."""
    return scoring.knn_logprob(
        retrieval.scores, retrieval.vals, cache.targets, int(k), float(temperature), ids=retrieval.ids
    )


def tune_lambda_on(valid_path: str | Path, analysed: Cache, retrieval: Retrieval, knobs: KnnKnobs) -> float:
    """λ tuned on the validation cache ``valid_path`` of the same model, with the same retrieval knobs."""
    valid = Cache(valid_path)
    if valid.path.resolve() == analysed.path.resolve():
        raise KnnlmError(
            f"--valid-cache {valid.path} is the cache being analysed: λ would be tuned on the split it is "
            f"reported on; pass another split's cache or a number as --lambda"
        )
    if valid.split == "test":
        raise KnnlmError(f"{valid.path / 'meta.json'} says split 'test': tune λ on the validation split's cache")
    for attr in ("checkpoint_fingerprint", "dict_size", "dictionary_fingerprint"):
        a, b = getattr(valid, attr), getattr(analysed, attr)
        if a is not None and b is not None and a != b:
            raise KnnlmError(
                f"{valid.path / 'meta.json'} and {analysed.path / 'meta.json'} differ in {attr}: --valid-cache "
                f"must come from the same model as --cache; pass them in the same order"
            )
    valid_retrieval = open_retrieval(valid, knobs)
    check_retrieval_pair(valid_retrieval, retrieval)
    knn = knn_logprobs(valid, valid_retrieval, knobs.k, knobs.temperature)
    return scoring.tune_lambda(np.asarray(valid.lm_logprob, dtype=np.float64), knn)


def labels_for(caches: Sequence[str | Path], labels: Sequence[str] | None) -> list[str]:
    """One label per cache: the given ones, or the cache folder names (with their parent when they clash)."""
    if not labels:
        names = [Path(c).name or str(c) for c in caches]
        if len(set(names)) == len(names):
            return names
        return [f"{Path(c).parent.name}/{Path(c).name}" for c in caches]  # e.g. omega0/test, omega1/test
    if len(labels) != len(caches):
        raise KnnlmError(f"{len(labels)} --label for {len(caches)} --cache; give one label per cache, in order")
    names = [str(label) for label in labels]
    if len(set(names)) != len(names):
        raise KnnlmError(f"--label values must differ (got {', '.join(names)}): they name the panels and rows")
    return names


def load_models(
    caches: Sequence[str | Path],
    labels: Sequence[str] | None,
    knobs: KnnKnobs,
    vocab: Vocabulary | None,
    *,
    need_knn: bool = True,
    valid_caches: Sequence[str | Path] | None = None,
    max_models: int = 4,
) -> list[ModelTokens]:
    """Open each cache, check it against the dictionary, and compute its per-token log-probs."""
    if not caches:
        raise KnnlmError("give at least one --cache DIR (one per compared model)")
    if len(caches) > max_models:
        raise KnnlmError(f"{len(caches)} --cache given; this analysis compares at most {max_models} models")
    knobs.check()
    names = labels_for(caches, labels)
    tune = knobs.lam == TUNE
    if need_knn and tune and len(valid_caches or ()) != len(caches):
        raise KnnlmError(
            f"--lambda tune needs one --valid-cache per --cache (got {len(valid_caches or ())} for "
            f"{len(caches)}); or give --lambda a number"
        )
    models = []
    for i, (path, label) in enumerate(zip(caches, names, strict=True)):
        cache = Cache(path)
        if vocab is not None:
            check_cache_vocabulary(cache.path, cache.dict_size, cache.dictionary_fingerprint, vocab)
        lm = np.asarray(cache.lm_logprob, dtype=np.float64)
        knn, lam, name = None, 0.0, None
        if need_knn:
            retrieval = open_retrieval(cache, knobs)
            name = retrieval.info.name
            knn = knn_logprobs(cache, retrieval, knobs.k, knobs.temperature)
            lam = tune_lambda_on(list(valid_caches or ())[i], cache, retrieval, knobs) if tune else float(knobs.lam)
        models.append(ModelTokens(label, cache, lm, knn, lam, name))
    if len({m.cache.split for m in models}) > 1:
        raise KnnlmError(
            f"the caches are of different splits ({', '.join(f'{m.label}: {m.cache.split}' for m in models)}); "
            f"compare models on the same split"
        )
    return models


@dataclass(kw_only=True)
class ModelsConfig(KnnKnobs):
    """Options shared by the analyses that compare models through their caches."""

    out: str | Path
    caches: list[str | Path]
    labels: list[str] | None = None
    valid_caches: list[str | Path] | None = None  # for --lambda tune: one per cache, same model, another split
    dictionary: str | Path | None = None  # dict.txt (default: <data_bin>/dict.txt)
    data_bin: str | Path | None = None

    def settings(self) -> dict[str, Any]:
        """The options particular to one analysis (those a subclass adds), for the JSON output."""
        shared = {f.name for f in fields(ModelsConfig)}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in shared}
