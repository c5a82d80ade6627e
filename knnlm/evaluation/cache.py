"""The per-token cache of one split: the contract between the dump phase and the score phase.

The expensive passes (LM forward, retrieval) run once and write this folder; every
λ/τ/k/mask/score/subsample ablation is then a pass over memory-mapped arrays::

    CACHE/
      meta.json            written last (atomically): see below
      targets.npy          int64   [T]          target token ids
      lm_logprob.npy       float32 [T]          base LM log-prob of the target (natural log)
      query_att.npy        float16 [T, D_att]   optional, not needed for scoring
      query_ffn.npy        float16 [T, D_ffn]   optional, not needed for scoring
      positions.npy        int32   [T]          optional, target position in its window
      word_ids.npy         int64   [T]          optional, the dataset word of each token (sub-word tokens)
      knn/<name>/          one folder per retrieval, e.g. att-l2-faiss, att-l2-faiss-realscore
        ids.npy            int64   [T, k_max]   datastore row ids, ranked by the mask source
        scores.npy         float32 [T, k_max]   similarity, higher is better (IP q·k, L2 -||q-k||²)
        vals.npy           int64   [T, k_max]   datastore values: next-token ids of the neighbours
        meta.json          written last: see below

``meta.json`` of the cache (extra keys are kept and ignored)::

    {"format": "knnlm-cache", "format_version": 1, "split": "valid", "n_tokens": T,
     "k_max": K, "key_dims": {"att": D, "ffn": D}, "dict_size": V,
     "checkpoint_fingerprint": "...", "dictionary_fingerprint": "..." (optional),
     "base_model": {"kind": "hf", ...} (optional: a --hf-model dump; the datastore must match it),
     "units": {"token": "...", "word": "...", "n_words": W} (optional: tokens are word pieces),
     "retrievals": [{"name": "att-l2-faiss", "key_type": "att", "similarity": "l2",
                     "mask_source": "faiss", "score_source": "faiss"}, ...]}

``knn/<name>/meta.json``::

    {"name": "att-l2-faiss", "key_type": "att", "similarity": "l2",
     "mask_source": "faiss", "score_source": "faiss", "k_max": K,
     "datastore": {"path": "...", "size": N, "fingerprint": "..." (optional),
                   "subsample": {"ratio": r, "seed": s, "kept": n} or null (optional; a
                   datastore built with --subsample; "subsample_ratio": r is read too)},
     "index": {"factory": "IVF4096,PQ64", "nprobe": 32} or null (exact search)}

Columns are ranked by the mask source, best first; for a FAISS-mask/real-score
retrieval that is FAISS's order, so that mask-to-k with k < k_max keeps FAISS's
top k. A neighbour FAISS did not find has id -1 and score -inf.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from knnlm.errors import KnnlmError
from knnlm.io import write_json_atomic as _write_json_atomic

CACHE_FORMAT = "knnlm-cache"
CACHE_FORMAT_VERSION = 1
KEY_TYPES = ("att", "ffn")
SIMILARITIES = ("l2", "ip")
SOURCES = ("faiss", "real")

_REQUIRED_META = (
    "format",
    "format_version",
    "split",
    "n_tokens",
    "k_max",
    "key_dims",
    "dict_size",
    "checkpoint_fingerprint",
    "retrievals",
)
_RETRIEVAL_KNOBS = ("key_type", "similarity", "mask_source", "score_source")


@dataclass(frozen=True)
class RetrievalInfo:
    """What a retrieval folder holds: which keys, which similarity, where mask and scores came from."""

    name: str
    key_type: str
    similarity: str
    mask_source: str
    score_source: str
    k_max: int
    datastore: dict[str, Any] = field(default_factory=dict)
    index: dict[str, Any] | None = None
    spec: dict[str, Any] | None = None  # what its content depends on (datastore, index file, nprobe, k, ...)

    def __post_init__(self) -> None:
        for knob, allowed in zip(_RETRIEVAL_KNOBS, (KEY_TYPES, SIMILARITIES, SOURCES, SOURCES), strict=True):
            if getattr(self, knob) not in allowed:
                raise ValueError(f"{knob} must be one of {allowed}, got {getattr(self, knob)!r}")

    @property
    def knobs(self) -> tuple[str, str, str, str]:
        """(key type, similarity, mask source, score source): how the score phase picks a retrieval."""
        return (self.key_type, self.similarity, self.mask_source, self.score_source)

    @property
    def datastore_subsample(self) -> float:
        """Fraction of the training tokens the datastore was built from (1.0 unless ``--subsample``).

        Read from ``datastore.subsample_ratio`` or, as the datastore's own meta.json
        writes it, ``datastore.subsample.ratio``.
        """
        if self.datastore.get("subsample_ratio") is not None:
            return float(self.datastore["subsample_ratio"])
        sub = self.datastore.get("subsample")
        if isinstance(sub, dict) and sub.get("ratio") is not None:
            return float(sub["ratio"])
        return 1.0


def default_retrieval_name(key_type: str, similarity: str, mask_source: str, score_source: str) -> str:
    """Folder name convention: ``att-l2-faiss``, ``att-l2-faiss-realscore``, ``att-ip-real``."""
    name = f"{key_type}-{similarity}-{mask_source}"
    if score_source != mask_source:
        name += f"-{score_source}score"
    return name


def write_json_atomic(path: Path, obj: Mapping[str, Any]) -> None:
    """Strict JSON (no NaN/inf), written atomically: readers never see half a file."""
    _write_json_atomic(path, obj, allow_nan=False)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise KnnlmError(
            f"{path} is missing: {what} is not a cache or was not completely written "
            f"(meta.json is written last); re-run the dump for it"
        )
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise KnnlmError(f"{path} is not readable JSON ({err}); re-run the dump") from err
    if not isinstance(obj, dict):
        raise KnnlmError(f"{path} must hold a JSON object; re-run the dump")
    return obj


def _open_array(path: Path, shape: tuple[int, ...], kinds: str, what: str, min_itemsize: int = 1) -> np.ndarray:
    """Memory-map ``path`` and check its shape and dtype against the meta data."""
    if not path.is_file():
        raise KnnlmError(f"{path} is missing ({what}); re-run the dump for this cache")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise KnnlmError(f"{path} is not a readable .npy file ({err}); re-run the dump") from err
    if arr.shape != shape:
        raise KnnlmError(
            f"{path} has shape {arr.shape}, meta.json says {shape}; the cache is inconsistent, re-run the dump"
        )
    if arr.dtype.kind not in kinds or arr.dtype.itemsize < min_itemsize:
        raise KnnlmError(f"{path} has dtype {arr.dtype}, expected {what}; re-run the dump with a current knnlm")
    return arr


@dataclass
class Retrieval:
    """One retrieval of a cache: memory-mapped neighbour ids, scores and values."""

    path: Path
    info: RetrievalInfo
    ids: np.ndarray
    scores: np.ndarray
    vals: np.ndarray


class Cache:
    """A verified, memory-mapped cache folder of one split (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise KnnlmError(f"cache folder {self.path} does not exist; run the dump first or fix the path")
        meta_path = self.path / "meta.json"
        self.meta = _read_json(meta_path, str(self.path))
        missing = [key for key in _REQUIRED_META if key not in self.meta]
        if missing:
            raise KnnlmError(
                f"{meta_path} lacks {', '.join(missing)}; it was written by another tool or version, re-run the dump"
            )
        if self.meta["format"] != CACHE_FORMAT or self.meta["format_version"] != CACHE_FORMAT_VERSION:
            raise KnnlmError(
                f"{meta_path} is format {self.meta['format']!r} v{self.meta['format_version']}, this knnlm "
                f"reads {CACHE_FORMAT!r} v{CACHE_FORMAT_VERSION}; re-run the dump with this version"
            )
        self.split = str(self.meta["split"])
        self.n_tokens = int(self.meta["n_tokens"])
        self.k_max = int(self.meta["k_max"])
        self.dict_size = int(self.meta["dict_size"])
        self.checkpoint_fingerprint = str(self.meta["checkpoint_fingerprint"])
        if self.n_tokens < 1 or self.k_max < 0 or self.dict_size < 1:
            raise KnnlmError(f"{meta_path}: n_tokens and dict_size must be positive; re-run the dump")
        self.targets = _open_array(self.path / "targets.npy", (self.n_tokens,), "iu", "integer token ids")
        self.lm_logprob = _open_array(self.path / "lm_logprob.npy", (self.n_tokens,), "f", "float log-probs")
        self._check_targets_and_lm()
        self._check_optional_arrays()
        self._listing: dict[str, dict[str, Any]] = {}
        for entry in self.meta["retrievals"]:
            if not isinstance(entry, dict) or "name" not in entry:
                raise KnnlmError(f"{meta_path}: every entry of 'retrievals' needs a name; re-run the dump")
            self._listing[str(entry["name"])] = entry
        self._opened: dict[str, Retrieval] = {}

    def _check_targets_and_lm(self) -> None:
        targets = np.asarray(self.targets)
        if targets.min() < 0 or targets.max() >= self.dict_size:
            raise KnnlmError(
                f"{self.path / 'targets.npy'} has token ids outside [0, {self.dict_size}) of the dictionary "
                f"named in meta.json; the cache mixes dictionaries, re-run the dump"
            )
        lm = np.asarray(self.lm_logprob)
        if np.isnan(lm).any() or (lm > 1e-3).any():
            raise KnnlmError(
                f"{self.path / 'lm_logprob.npy'} holds NaN or positive values; it must be natural-log "
                f"probabilities of the targets, re-run the dump"
            )

    def _check_optional_arrays(self) -> None:
        """Queries and positions are not needed for scoring, but a cache holding wrong ones is broken."""
        key_dims = self.meta["key_dims"] if isinstance(self.meta["key_dims"], dict) else {}
        for key_type in KEY_TYPES:
            path = self.path / f"query_{key_type}.npy"
            if path.is_file():
                if key_type not in key_dims:
                    raise KnnlmError(f"{path} exists but meta.json has no key_dims.{key_type}; re-run the dump")
                _open_array(path, (self.n_tokens, int(key_dims[key_type])), "f", f"float {key_type} queries")
        if (self.path / "positions.npy").is_file():
            _open_array(self.path / "positions.npy", (self.n_tokens,), "iu", "integer positions")

    @property
    def dictionary_fingerprint(self) -> str | None:
        value = self.meta.get("dictionary_fingerprint")
        return None if value is None else str(value)

    @property
    def retrieval_names(self) -> list[str]:
        return list(self._listing)

    def describe_retrievals(self) -> str:
        """One line listing what this cache holds, for error messages."""
        if not self._listing:
            return "none"
        return ", ".join(
            f"{name} ({'/'.join(str(e.get(k)) for k in _RETRIEVAL_KNOBS)})" for name, e in self._listing.items()
        )

    def retrieval(self, name: str) -> Retrieval:
        """Open (and verify) the retrieval folder ``knn/<name>``."""
        if name in self._opened:
            return self._opened[name]
        if name not in self._listing:
            raise KnnlmError(
                f"{self.path / 'meta.json'} lists no retrieval {name!r}; it holds: {self.describe_retrievals()}"
            )
        folder = self.path / "knn" / name
        meta_path = folder / "meta.json"
        meta = _read_json(meta_path, str(folder))
        try:
            info = RetrievalInfo(
                name=str(meta["name"]),
                key_type=meta["key_type"],
                similarity=meta["similarity"],
                mask_source=meta["mask_source"],
                score_source=meta["score_source"],
                k_max=int(meta["k_max"]),
                datastore=dict(meta.get("datastore") or {}),
                index=meta.get("index"),
                spec=meta.get("spec"),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise KnnlmError(f"{meta_path} is malformed ({err}); re-run the dump") from err
        listed = self._listing[name]
        if info.name != name or any(listed.get(k) != getattr(info, k) for k in _RETRIEVAL_KNOBS if k in listed):
            raise KnnlmError(
                f"{meta_path} disagrees with {self.path / 'meta.json'} about retrieval {name!r}; re-run the dump"
            )
        if info.k_max < 1 or info.k_max > self.k_max:
            raise KnnlmError(f"{meta_path}: k_max={info.k_max} must be in [1, {self.k_max}]; re-run the dump")
        shape = (self.n_tokens, info.k_max)
        retrieval = Retrieval(
            path=folder,
            info=info,
            ids=_open_array(folder / "ids.npy", shape, "iu", "integer datastore ids"),
            scores=_open_array(folder / "scores.npy", shape, "f", "float similarity scores"),
            vals=_open_array(
                folder / "vals.npy",
                shape,
                "iu",
                "int32/int64 token ids (int16 overflows large vocabularies)",
                min_itemsize=4,
            ),
        )
        self._opened[name] = retrieval
        return retrieval

    def find(self, key_type: str, similarity: str, mask_source: str, score_source: str) -> Retrieval:
        """The retrieval with these knobs; an error listing what exists if there is none (or two)."""
        wanted = (key_type, similarity, mask_source, score_source)
        names = [n for n, e in self._listing.items() if tuple(e.get(k) for k in _RETRIEVAL_KNOBS) == wanted]
        if not names:
            raise KnnlmError(
                f"{self.path} has no retrieval with key type {key_type}, similarity {similarity}, "
                f"{mask_source} mask, {score_source} score; it holds: {self.describe_retrievals()}. "
                f"Dump that retrieval or pick one of these settings"
            )
        if len(names) > 1:
            raise KnnlmError(
                f"{self.path / 'meta.json'} lists several retrievals with knobs {wanted}: {', '.join(names)}; keep one"
            )
        return self.retrieval(names[0])

    def has(self, key_type: str, similarity: str, mask_source: str, score_source: str) -> bool:
        wanted = (key_type, similarity, mask_source, score_source)
        return any(tuple(e.get(k) for k in _RETRIEVAL_KNOBS) == wanted for e in self._listing.values())


def check_pair(valid: Cache, test: Cache | None) -> None:
    """Refuse a validation/test pair that comes from different models or would tune on test."""
    if valid.split == "test":
        raise KnnlmError(
            f"{valid.path / 'meta.json'} says split 'test': λ is tuned on the validation cache and never on "
            f"test; pass the validation split's cache as --valid-cache"
        )
    if test is None:
        return
    if valid.path.resolve() == test.path.resolve():
        raise KnnlmError(
            f"--valid-cache and --test-cache are the same folder {valid.path}; λ would be tuned "
            f"on the split it is reported on. Pass the test split's cache as --test-cache"
        )
    for attr in ("checkpoint_fingerprint", "dict_size", "dictionary_fingerprint"):
        a, b = getattr(valid, attr), getattr(test, attr)
        if a is not None and b is not None and a != b:
            raise KnnlmError(
                f"{valid.path / 'meta.json'} and {test.path / 'meta.json'} differ in {attr} ({a} vs {b}): "
                f"the caches come from different models or dictionaries; dump both with the same checkpoint"
            )


def check_retrieval_pair(valid: Retrieval, test: Retrieval) -> None:
    """Refuse scoring validation and test against different datastores or indexes."""
    a, b = valid.info, test.info
    for what, x, y in (
        ("datastore", a.datastore, b.datastore),
        ("index", a.index, b.index),
    ):
        if x != y:
            raise KnnlmError(
                f"{valid.path / 'meta.json'} and {test.path / 'meta.json'} use a different {what} "
                f"({x} vs {y}); dump both splits against the same one"
            )


@dataclass
class RetrievalArrays:
    """A retrieval to write with :func:`write_cache`: its description and its three arrays."""

    info: RetrievalInfo
    ids: np.ndarray
    scores: np.ndarray
    vals: np.ndarray


def write_cache(
    path: str | os.PathLike[str],
    *,
    split: str,
    targets: np.ndarray,
    lm_logprob: np.ndarray,
    dict_size: int,
    checkpoint_fingerprint: str,
    key_dims: Mapping[str, int],
    retrievals: Sequence[RetrievalArrays] = (),
    query_att: np.ndarray | None = None,
    query_ffn: np.ndarray | None = None,
    positions: np.ndarray | None = None,
    extra_meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write a cache folder in the contract's dtypes, meta files last. Used by tests and benchmarks."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "targets.npy", np.asarray(targets, dtype=np.int64))
    np.save(path / "lm_logprob.npy", np.asarray(lm_logprob, dtype=np.float32))
    for name, arr, dtype in (
        ("query_att", query_att, np.float16),
        ("query_ffn", query_ffn, np.float16),
        ("positions", positions, np.int32),
    ):
        if arr is not None:
            np.save(path / f"{name}.npy", np.asarray(arr, dtype=dtype))
    for r in retrievals:
        folder = path / "knn" / r.info.name
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "ids.npy", np.asarray(r.ids, dtype=np.int64))
        np.save(folder / "scores.npy", np.asarray(r.scores, dtype=np.float32))
        np.save(folder / "vals.npy", np.asarray(r.vals, dtype=np.int64))
    return write_cache_meta(
        path,
        split=split,
        n_tokens=int(np.shape(targets)[0]),
        dict_size=dict_size,
        checkpoint_fingerprint=checkpoint_fingerprint,
        key_dims=key_dims,
        retrievals=[r.info for r in retrievals],
        extra_meta=extra_meta,
    )


def write_cache_meta(
    path: str | os.PathLike[str],
    *,
    split: str,
    n_tokens: int,
    dict_size: int,
    checkpoint_fingerprint: str,
    key_dims: Mapping[str, int],
    retrievals: Sequence[RetrievalInfo],
    extra_meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write the retrieval and cache meta files for arrays already on disk (e.g. streamed memmaps)."""
    path = Path(path)
    for info in retrievals:
        write_json_atomic(path / "knn" / info.name / "meta.json", asdict(info))
    meta: dict[str, Any] = dict(extra_meta or {})
    meta.update(
        format=CACHE_FORMAT,
        format_version=CACHE_FORMAT_VERSION,
        split=split,
        n_tokens=int(n_tokens),
        k_max=max((info.k_max for info in retrievals), default=0),
        key_dims={str(k): int(v) for k, v in key_dims.items()},
        dict_size=int(dict_size),
        checkpoint_fingerprint=checkpoint_fingerprint,
        retrievals=[{"name": info.name, **dict(zip(_RETRIEVAL_KNOBS, info.knobs, strict=True))} for info in retrievals],
    )
    write_json_atomic(path / "meta.json", meta)
    return path
