"""FAISS indexes over a datastore: build (train on a seeded sample, add in chunks), load, search.

An index file ``X`` comes with a sidecar ``X.meta.json`` written last: the
factory string, metric, ``nprobe`` default, training sample, and the id of the
datastore it indexes. :meth:`KnnIndex.load` refuses an index against any other
datastore, and an index file whose sidecar is missing or does not match it.

Training and adding run on faiss GPUs when ``faiss.get_num_gpus() > 0`` (the
coarse k-means through a GPU clustering index; adding through a GPU clone
where faiss supports the index type), on the CPU otherwise.

:meth:`KnnIndex.search` returns scores in the project's convention
(:mod:`knnlm.datastore.similarity`): FAISS's L2 output is a *squared* distance
and is negated at this boundary.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import faiss
import numpy as np
from omegaconf import MISSING
from tqdm import tqdm

from knnlm.datastore.meta import FORMAT_VERSION, INDEX_FORMAT
from knnlm.datastore.sampling import sample_sorted
from knnlm.datastore.similarity import Similarity, check_similarity, faiss_distances_to_scores
from knnlm.datastore.store import Datastore
from knnlm.errors import KnnlmError, require_at_least
from knnlm.io import WriterLock, code_version, read_json, sha256_files, utc_now, write_json_atomic

logger = logging.getLogger(__name__)

DEFAULT_FACTORY = "IVF4096,PQ64"
AUTO_FACTORY = "auto"
# faiss's ClusteringParameters.min_points_per_centroid: below it faiss warns that
# k-means is under-trained; the same rule is applied to IVF lists and PQ centroids.
MIN_POINTS_PER_CENTROID = 39

_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


@dataclass
class IndexBuildConfig:
    """Options of ``knnlm index build`` / ``knnlm index train`` (also the hydra schema; the CLI is generated
    from it)."""

    datastore: str = field(default=MISSING, metadata={"help": "datastore folder (e.g. datastores/wt103/ffn)"})
    out: str = field(default=MISSING, metadata={"help": "index file to write; its metadata goes to OUT.meta.json"})
    factory: str = field(
        default=DEFAULT_FACTORY,
        metadata={"help": f"faiss factory string, or 'auto' for small datastores (default {DEFAULT_FACTORY})"},
    )
    metric: str = field(default="l2", metadata={"help": "inner product or (squared) L2; scores are q.k or -||q-k||^2"})
    train_size: int = field(default=1_000_000, metadata={"help": "keys sampled (with --seed) to train the index"})
    seed: int = field(default=1, metadata={"help": "seed of the training sample"})
    add_chunk: int = field(default=1 << 18, metadata={"help": "keys added per call"})
    nprobe: int = field(default=32, metadata={"help": "default nprobe stored in the index"})
    device: str = field(default="auto", metadata={"help": "auto (faiss GPUs if present), cpu, cuda"})
    trained: Optional[str] = field(
        default=None, metadata={"help": "trained empty index from `knnlm index train` (sharded builds)"}
    )
    train_only: bool = field(default=False, metadata={"help": "only train an empty index (knnlm index train)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an index built with other settings"})


def sidecar_path(index_path: str | os.PathLike) -> Path:
    """Where the metadata of an index file lives."""
    return Path(f"{index_path}.meta.json")


def trained_path(index_path: str | os.PathLike) -> Path:
    """The trained-but-empty index kept next to ``index_path`` (reused by resumed or sharded builds)."""
    path = Path(index_path)
    return path.with_name(f"{path.stem}.trained{path.suffix or '.faiss'}")


def use_gpu(device: str) -> bool:
    """Whether faiss should run on GPUs: ``auto`` uses them when faiss sees any."""
    if device == "cpu":
        return False
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device in ("cuda", "gpu") and gpus == 0:
        raise KnnlmError(f"--device {device} asked for faiss GPUs but this faiss sees none (faiss-cpu?)")
    if device not in ("auto", "cuda", "gpu"):
        raise KnnlmError(f"--device must be auto, cpu or cuda; got {device!r}")
    return gpus > 0


# --------------------------------------------------------------------------- factory strings


def _parse(factory: str) -> tuple[int | None, int | None, int]:
    """``(nlist, pq_m, pq_nbits)`` of a factory string (None where absent)."""
    ivf = re.search(r"IVF(\d+)", factory)
    pq = re.search(r"PQ(\d+)(?:x(\d+))?", factory)
    nbits = int(pq.group(2)) if pq and pq.group(2) else 8
    return (int(ivf.group(1)) if ivf else None), (int(pq.group(1)) if pq else None), nbits


def _largest_divisor(d: int, bound: int) -> int:
    return max(m for m in range(1, max(1, bound) + 1) if d % m == 0)


def auto_factory(num_keys: int, key_dim: int, train_points: int) -> str:
    """A factory string for ``num_keys`` keys, in the spirit of kNN-LM's ``IVF4096,PQ64``.

    ``Flat`` (exact) below ``39·256`` training keys, where PQ cannot be trained
    well; otherwise ``IVF{nlist},PQ{m}`` with nlist the largest power of two
    ≤ √N that keeps ≥ 39 training keys per list, and m the largest divisor of
    D ≤ min(64, D/4) (WIKI-103, D=1024: 64 sub-quantizers of 16 dims).
    """
    if train_points < MIN_POINTS_PER_CENTROID * 256:
        return "Flat"
    bound = min(math.isqrt(num_keys), train_points // MIN_POINTS_PER_CENTROID)
    nlist = 1 << (bound.bit_length() - 1)
    return f"IVF{nlist},PQ{_largest_divisor(key_dim, min(64, key_dim // 4))}"


def check_factory(factory: str, key_dim: int, num_keys: int, train_points: int) -> None:
    """Refuse factories that ``num_keys``/``train_points`` cannot train, naming the largest valid choice."""
    nlist, m, nbits = _parse(factory)
    where = f"--factory {factory}"
    if nlist is not None and nlist * MIN_POINTS_PER_CENTROID > train_points:
        largest = train_points // MIN_POINTS_PER_CENTROID
        if largest < 1:
            raise KnnlmError(
                f"{where}: {train_points} training keys cannot train any IVF index "
                f"(≥ {MIN_POINTS_PER_CENTROID} per list); use --factory Flat"
            )
        pow2 = 1 << (largest.bit_length() - 1)
        more = "" if train_points == num_keys else f" (or raise --train-size, up to N={num_keys})"
        raise KnnlmError(
            f"{where}: IVF{nlist} needs {nlist * MIN_POINTS_PER_CENTROID} training keys "
            f"({MIN_POINTS_PER_CENTROID} per list) but only {train_points} are available{more}; "
            f"the largest valid nlist is {largest} (largest power of two: {pow2}), "
            f"e.g. --factory {factory.replace(f'IVF{nlist}', f'IVF{pow2}', 1)}, or use --factory auto"
        )
    if m is not None:
        if key_dim % m:
            raise KnnlmError(
                f"{where}: PQ{m} needs m to divide the key dimension {key_dim}; "
                f"the largest valid m ≤ {m} is {_largest_divisor(key_dim, m)}"
            )
        need = MIN_POINTS_PER_CENTROID * (1 << nbits)
        if train_points < need:
            raise KnnlmError(
                f"{where}: PQ with {nbits}-bit codes needs {need} training keys but only {train_points} "
                f"are available; use fewer bits (e.g. PQ{m}x4), --factory Flat, or --factory auto"
            )


def _new_index(factory: str, key_dim: int, metric: Similarity) -> faiss.Index:
    """``faiss.index_factory`` without polysemous training of IVF-PQ codes.

    The factory turns it on for ``IVF…,PQ…``; it only reorders PQ centroids for
    polysemous Hamming filtering, which knnlm never enables, leaves every ADC
    score unchanged, and costs most of the training time (kNN-LM's
    ``IndexIVFPQ`` constructor has it off as well).
    """
    try:
        index = faiss.index_factory(key_dim, factory, _METRICS[metric])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KnnlmError(f"faiss cannot build --factory {factory!r} for dimension {key_dim}: {first}") from None
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf = faiss.downcast_index(ivf)
        if hasattr(ivf, "do_polysemous_training"):
            ivf.do_polysemous_training = False
    return index


# --------------------------------------------------------------------------- building


def _gather_float32(keys: np.ndarray, rows: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    out = np.empty((len(rows), keys.shape[1]), dtype=np.float32)
    for start in range(0, len(rows), chunk):
        out[start : start + chunk] = keys[rows[start : start + chunk]]
    return out


def _index_meta(
    role: str, factory: str, metric: str, store: Datastore, cfg: IndexBuildConfig, train_points: int
) -> dict[str, Any]:
    return {
        "format": INDEX_FORMAT,
        "format_version": FORMAT_VERSION,
        "role": role,
        "factory": factory,
        "metric": metric,
        "key_dim": store.key_dim,
        "key_type": store.key_type,
        "nprobe": cfg.nprobe if _parse(factory)[0] is not None else None,
        "train": {"datastore_id": store.datastore_id, "size": train_points, "seed": cfg.seed},
        "faiss_version": faiss.__version__,
        "code_version": code_version(),
    }


VERIFY_BYTES = 1 << 30  # index files up to this size are hashed on every load; larger ones with --verify


def write_index_file(index: faiss.Index, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Index file first (temp + rename), sidecar last; the file is hashed as it is written."""
    sidecar_path(path).unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    digest = hashlib.sha256()
    with open(tmp, "wb") as f:

        def write(block: bytes) -> None:
            digest.update(block)
            f.write(block)

        faiss.write_index(index, faiss.PyCallbackIOWriter(write))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    meta = dict(meta, index_bytes=path.stat().st_size, index_sha256=digest.hexdigest(), created=utc_now())
    if meta["role"] == "trained":
        meta["trained_id"] = sha256_files([path])
    write_json_atomic(sidecar_path(path), meta)
    return meta


def read_index_meta(path: Path, verify: bool | None = None) -> dict[str, Any]:
    """The sidecar of ``path``, checked against the file: its size always, its content hash when
    ``verify`` (``None``: for files up to :data:`VERIFY_BYTES`, cheap next to loading them)."""
    if not path.exists():
        raise KnnlmError(f"index file {path} does not exist; build it with `knnlm index build`")
    side = sidecar_path(path)
    if not side.exists():
        raise KnnlmError(
            f"{side} is missing: {path} is half-written or was not built by knnlm; rebuild it with `knnlm index build`"
        )
    meta = read_json(side, "index metadata")
    if meta.get("format") != INDEX_FORMAT:
        raise KnnlmError(f"{side} is not knnlm index metadata (format {meta.get('format')!r})")
    if meta.get("index_bytes") != path.stat().st_size:
        raise KnnlmError(
            f"{path} has {path.stat().st_size} bytes but {side.name} records {meta.get('index_bytes')}: "
            f"the file changed after it was built; rebuild it"
        )
    if verify is None:
        verify = path.stat().st_size <= VERIFY_BYTES
    if verify and meta.get("index_sha256") and sha256_files([path]) != meta["index_sha256"]:
        raise KnnlmError(
            f"{path} does not have the content its sidecar {side.name} records (sha256 differs): the file is "
            f"corrupt or was replaced by another index of the same size; rebuild it with `knnlm index build`"
        )
    return meta


def _train(
    store: Datastore, factory: str, metric: Similarity, cfg: IndexBuildConfig, train_points: int, gpu: bool
) -> tuple[faiss.Index, bool]:
    """A trained empty index, and whether training was needed (Flat needs none)."""
    index = _new_index(factory, store.key_dim, metric)
    if index.is_trained:
        return index, False
    rows = sample_sorted(store.num_keys, train_points, cfg.seed)
    logger.info("training %s on %d keys sampled with seed %d", factory, train_points, cfg.seed)
    sample = _gather_float32(store.keys, rows)
    ivf = faiss.try_extract_index_ivf(index)
    if gpu and ivf is not None:
        # the coarse k-means is the expensive part: run its assignments on all GPUs
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(store.key_dim, _METRICS[metric]))
    index.train(sample)
    if ivf is not None:
        ivf.clustering_index = None
    return index, True


def id_offset_for(factory: str, store: Datastore) -> int:
    """What an index adds to the row numbers of ``store`` to get the ids it stores.

    IVF indexes over a shard datastore store the rows of the *merged* datastore
    (the shard's ``first_row`` + local row), so that faiss can merge their
    inverted lists without shifting ids (``merge_from_multiple``'s
    ``shift_ids`` offsets shard i by the sizes of shards 1..i, not 0..i−1, in
    faiss ≤ 1.15, which is wrong for unequal shards). Other indexes (Flat)
    cannot take ids and store local rows. :meth:`KnnIndex.search` always
    returns rows of the datastore it was loaded with.
    """
    if _parse(factory)[0] is None:
        return 0
    return int(store.meta.get("shard", {}).get("first_row", 0))


def _add(index: faiss.Index, store: Datastore, chunk: int, gpu: bool, id_offset: int) -> faiss.Index:
    target = index
    if gpu:
        try:
            options = faiss.GpuMultipleClonerOptions()
            options.useFloat16 = True
            target = faiss.index_cpu_to_all_gpus(index, options)
        except (RuntimeError, AttributeError) as err:
            logger.info("adding on the CPU: faiss cannot move this index to GPUs (%s)", err)
            target = index
    with tqdm(total=store.num_keys, unit="key", unit_scale=True, desc="index add", disable=None) as bar:
        for start in range(0, store.num_keys, chunk):
            block = np.ascontiguousarray(store.keys[start : start + chunk], dtype=np.float32)
            if faiss.try_extract_index_ivf(index) is not None:
                target.add_with_ids(block, np.arange(start, start + len(block), dtype=np.int64) + id_offset)
            else:
                target.add(block)
            bar.update(len(block))
    return faiss.index_gpu_to_cpu(target) if target is not index else index


def _load_trained(path: Path, store: Datastore, metric: str) -> tuple[faiss.Index, dict[str, Any]]:
    meta = read_index_meta(path)
    if meta.get("role") != "trained":
        raise KnnlmError(
            f"{path} is not a trained empty index (role {meta.get('role')!r}); pass the "
            f"file written by `knnlm index train`"
        )
    if meta["key_dim"] != store.key_dim or meta["metric"] != metric:
        raise KnnlmError(
            f"{path} was trained for dimension {meta['key_dim']} / metric {meta['metric']}, but the "
            f"datastore has dimension {store.key_dim} and --metric is {metric}; train an index for it"
        )
    index = faiss.read_index(str(path))
    if index.ntotal != 0 or not index.is_trained:
        raise KnnlmError(f"{path} must be a trained, empty index; rebuild it with `knnlm index train`")
    return index, meta


def build_index(cfg: IndexBuildConfig) -> Path:
    """Build the index ``cfg.out`` over ``cfg.datastore`` (or only train it, with ``train_only``).

    A finished index with the same settings is left as it is; a different one is
    refused unless ``overwrite``. The trained empty index is kept as
    :func:`trained_path` so a build interrupted while adding restarts there.

    Holds the output's :class:`~knnlm.io.WriterLock` meanwhile: a second writer is refused.
    """
    for option, value in (("--nprobe", cfg.nprobe), ("--train-size", cfg.train_size), ("--add-chunk", cfg.add_chunk)):
        require_at_least(option, value, 1)
    with WriterLock(f"{cfg.out}.lock", f"index {cfg.out}"):
        return _build_index(cfg)


def _build_index(cfg: IndexBuildConfig) -> Path:
    """:func:`build_index` under its lock."""
    store = Datastore.open(cfg.datastore)
    metric = check_similarity(cfg.metric)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    gpu = use_gpu(cfg.device)
    train_points = min(cfg.train_size, store.num_keys)
    if train_points < 1:
        raise KnnlmError(f"--train-size must be positive; got {cfg.train_size}")

    trained_meta: dict[str, Any] | None = None
    trained_index: faiss.Index | None = None
    if cfg.trained is not None:
        if cfg.train_only:
            raise KnnlmError("--trained and train-only exclude each other: the index is trained already")
        trained_index, trained_meta = _load_trained(Path(cfg.trained), store, metric)
        factory = trained_meta["factory"]
    else:
        factory = cfg.factory
        if factory == AUTO_FACTORY:
            factory = auto_factory(store.num_keys, store.key_dim, train_points)
            logger.info("--factory auto chose %s for N=%d, D=%d", factory, store.num_keys, store.key_dim)
        check_factory(factory, store.key_dim, store.num_keys, train_points)

    role = "trained" if cfg.train_only else "index"
    meta = _index_meta(role, factory, metric, store, cfg, train_points)
    meta["factory_requested"] = cfg.factory
    if trained_meta is not None:
        meta["train"] = trained_meta["train"]
        meta["trained_id"] = trained_meta["trained_id"]
    if role == "index":
        meta.update(datastore_id=store.datastore_id, ntotal=store.num_keys, id_offset=id_offset_for(factory, store))

    if out.exists() or sidecar_path(out).exists():
        if not cfg.overwrite:
            old = read_json(sidecar_path(out), "index metadata") if sidecar_path(out).exists() else {}
            same = all(old.get(k) == meta.get(k) for k in ("role", "factory", "metric", "datastore_id", "train"))
            if same and old.get("index_bytes") == (out.stat().st_size if out.exists() else None):
                logger.info("%s is complete already", out)
                return out
            raise KnnlmError(
                f"{out} exists and was not built with these settings (or is half-written); choose another "
                f"--out or pass --overwrite"
            )
        sidecar_path(out).unlink(missing_ok=True)
        out.unlink(missing_ok=True)

    if trained_index is None:
        cache = out if cfg.train_only else trained_path(out)
        trained_index = _reuse_trained(cache, meta)
        if trained_index is None:
            trained_index, trained_now = _train(store, factory, metric, cfg, train_points, gpu)
            if trained_now or cfg.train_only:
                write_index_file(trained_index, cache, {**meta, "role": "trained", "ntotal": 0, "datastore_id": None})
        if cfg.train_only:
            return out
    index = _add(trained_index, store, cfg.add_chunk, gpu, meta["id_offset"])
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = cfg.nprobe
    write_index_file(index, out, meta)
    return out


def _reuse_trained(path: Path, meta: dict[str, Any]) -> faiss.Index | None:
    """A trained index left by an earlier build with the same training settings, if any."""
    if not path.exists() or not sidecar_path(path).exists():
        return None
    try:
        old = read_index_meta(path)
    except KnnlmError:
        return None
    if any(old.get(k) != meta.get(k) for k in ("factory", "metric", "key_dim", "train")):
        return None
    logger.info("reusing the trained index %s", path)
    return faiss.read_index(str(path))


# --------------------------------------------------------------------------- searching


class KnnIndex:
    """A FAISS index bound to the datastore it was built from."""

    def __init__(
        self,
        index: faiss.Index,
        meta: dict[str, Any],
        path: Path | None = None,
        keepalive: Sequence[Any] = (),
    ) -> None:
        self.index = index
        # faiss wrappers (IndexShards) do not own their sub-indexes: hold them here
        self._keepalive = list(keepalive)
        self.meta = meta
        self.path = path
        self.similarity: Similarity = meta["metric"]
        self._nprobe: int | None = None
        if meta.get("nprobe") is not None:
            self.nprobe = int(meta["nprobe"])

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        datastore: Datastore,
        *,
        nprobe: int | None = None,
        device: str = "cpu",
        mmap: bool = False,
        gpu_shard: bool = False,
        verify: bool | None = None,
    ) -> KnnIndex:
        """Load an index after checking it was built from ``datastore``.

        ``device`` ``cuda``/``auto`` moves it to all faiss GPUs (replicated, or
        sharded across them with ``gpu_shard``: faiss's IndexReplicas /
        IndexShards); ``mmap`` leaves the inverted lists on disk. ``verify``: check
        the file's content hash (default: for files up to 1 GiB).
        """
        path = Path(path)
        meta = read_index_meta(path, verify=verify)
        if meta.get("role") != "index":
            raise KnnlmError(
                f"{path} is a trained empty index, not a searchable one; add keys with "
                f"`knnlm index build --trained {path}`"
            )
        check_index_meta(meta, datastore, str(path))
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap else 0)
        if index.ntotal != datastore.num_keys or index.d != datastore.key_dim:
            raise KnnlmError(f"{path} holds {index.ntotal} x {index.d} vectors, not what its metadata says; rebuild it")
        faiss_metric = faiss.METRIC_INNER_PRODUCT if meta["metric"] == "ip" else faiss.METRIC_L2
        if index.metric_type != faiss_metric:
            raise KnnlmError(f"{path} searches with another metric than its sidecar's {meta['metric']}; rebuild it")
        if use_gpu(device):
            options = faiss.GpuMultipleClonerOptions()
            options.useFloat16 = True
            options.shard = gpu_shard
            index = faiss.index_cpu_to_all_gpus(index, options)
        knn = cls(index, meta, path)
        if nprobe is not None:
            knn.nprobe = nprobe
        return knn

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def nprobe(self) -> int | None:
        """Inverted lists visited per query (None for indexes without lists, e.g. Flat)."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self.meta.get("nprobe") is None:
            raise KnnlmError(f"index {self.meta.get('factory')} has no inverted lists; nprobe does not apply")
        if value < 1:
            raise KnnlmError(f"nprobe must be positive; got {value}")
        space = faiss.GpuParameterSpace() if _on_gpu(self.index) else faiss.ParameterSpace()
        space.set_index_parameter(self.index, "nprobe", int(value))
        self._nprobe = int(value)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k``: ``(scores float32 [Q, k], ids int64 [Q, k])``, best first.

        Scores follow the project convention (IP: q·k; L2: −‖q−k‖², FAISS's
        squared distance negated); missing neighbours have id −1 and score −inf.
        Scores of compressed indexes (PQ) are approximations; use
        :func:`knnlm.datastore.exact.rescore` for exact ones.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.index.d:
            raise KnnlmError(f"queries must be [Q, {self.index.d}]; got {list(queries.shape)}")
        if k < 1:
            raise KnnlmError(f"k must be positive; got {k}")
        distances, ids = self.index.search(queries, k)
        ids = ids.astype(np.int64, copy=False)
        scores = faiss_distances_to_scores(distances, ids, self.similarity)
        offset = int(self.meta.get("id_offset", 0))
        if offset:
            ids = np.where(ids >= 0, ids - offset, ids)
        return scores, ids

    def __repr__(self) -> str:
        return (
            f"KnnIndex({self.meta.get('factory')!r}, metric={self.similarity!r}, ntotal={self.ntotal}, "
            f"nprobe={self.nprobe})"
        )


def _on_gpu(index: faiss.Index) -> bool:
    name = type(index).__name__
    return name.startswith("Gpu") or (
        name in ("IndexReplicas", "IndexShards") and index.count() > 0 and _on_gpu(index.at(0))
    )


def check_index_meta(meta: dict[str, Any], datastore: Datastore, where: str) -> None:
    """Refuse an index (sidecar ``meta``) against a datastore it was not built from."""
    if meta.get("datastore_id") != datastore.datastore_id:
        raise KnnlmError(
            f"{where} was built from datastore {str(meta.get('datastore_id'))[:12]}, not from "
            f"{datastore.path} (id {datastore.datastore_id[:12]}); its ids would point at other tokens. "
            f"Build an index for this datastore with `knnlm index build --datastore {datastore.path}`"
        )
    if meta.get("ntotal") != datastore.num_keys or meta.get("key_dim") != datastore.key_dim:
        raise KnnlmError(
            f"{where} holds {meta.get('ntotal')} x {meta.get('key_dim')} vectors but "
            f"{datastore.path} has {datastore.num_keys} x {datastore.key_dim}; rebuild the index"
        )


def index_info(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of an index file, its size and content hash verified."""
    return read_index_meta(Path(path), verify=True)
