"""A datastore on disk: ``keys.npy`` [N, D] fp16, ``vals.npy`` [N] int, ``meta.json`` (last).

Layout of one datastore folder::

    keys.npy        float16 [N, D]   memory-mappable .npy (row i = key of entry i)
    vals.npy        int32   [N]      next-token id of entry i
    positions.npy   int64   [N]      split position of entry i (only when subsampled)
    meta.json       written last, atomically; its presence means the folder is complete
    progress.json   only while a build runs or after it was interrupted

Without ``positions.npy`` entry ``i`` is the target token ``first_position + i`` of
the split; the split is ``source.split`` of the data folder ``paths.data``, whose
binarized files hash to ``source.data_sha256`` (:meth:`Datastore.split_source`).
Writers stream rows at their offsets in preallocated files, so no N×D array is
ever held in memory; :class:`Datastore` reads them memory-mapped.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from knnlm.datastore.meta import DATASTORE_FORMAT, FORMAT_VERSION
from knnlm.errors import KnnlmError
from knnlm.io import (
    NpyRowWriter,
    code_version,
    describe_differences,
    fingerprint,
    read_json,
    utc_now,
    write_json_atomic,
)

KEYS_FILE = "keys.npy"
VALS_FILE = "vals.npy"
POSITIONS_FILE = "positions.npy"
META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
DATA_FILES = (KEYS_FILE, VALS_FILE, POSITIONS_FILE)

KEY_DTYPE = "float16"
VAL_DTYPE = "int32"

# meta.json fields that describe *how* or *when* a datastore was made, not *what* it holds;
# every other field enters the datastore id.
NON_IDENTITY_FIELDS = frozenset({"datastore_id", "created", "code_version", "compute", "paths", "merged_from"})


def datastore_id(meta: dict[str, Any]) -> str:
    """Fingerprint of the identity fields of a datastore's metadata."""
    return fingerprint({k: v for k, v in meta.items() if k not in NON_IDENTITY_FIELDS})


def finalize_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Add the format, version, timestamp and id to a datastore's metadata."""
    meta = dict(meta, format=DATASTORE_FORMAT, format_version=FORMAT_VERSION)
    meta["datastore_id"] = datastore_id(meta)
    meta["code_version"] = code_version()
    meta["created"] = utc_now()
    return meta


def available_memory() -> int:
    """Bytes of memory the OS could hand out now (MemAvailable; physical pages elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _load_npy(path: Path, what: str) -> np.memmap:
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise KnnlmError(f"{path} is missing ({what}); rebuild the datastore") from None
    except (OSError, ValueError) as err:
        raise KnnlmError(f"{path} is not a readable .npy file ({what}): {err}; rebuild the datastore") from None


@dataclass(frozen=True)
class SplitSource:
    """Where a datastore's entries come from: a split of a data folder, by its recorded fingerprint."""

    data: str  # the data folder at build time (recorded, not part of the id)
    split: str
    data_sha256: str
    units: dict[str, Any] | None = None  # set when tokens are sub-word pieces (--hf-model)


class Datastore:
    """A verified, memory-mapped datastore. Open with :meth:`Datastore.open`."""

    def __init__(
        self,
        path: Path,
        meta: dict[str, Any],
        keys: np.ndarray,
        vals: np.ndarray,
        positions: np.ndarray | None,
    ) -> None:
        self.path = path
        self.meta = meta
        self.keys = keys
        self.vals = vals
        self._positions = positions

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        in_memory: bool = False,
        key_type: str | None = None,
        key_dim: int | None = None,
        dictionary_sha256: str | None = None,
        checkpoint_sha256: str | None = None,
    ) -> Datastore:
        """Open ``path`` after checking its metadata against its files and the given expectations.

        Keys and values stay memory-mapped unless ``in_memory``. A half-written
        folder, files that disagree with ``meta.json``, or a mismatch with an
        expectation raise :class:`KnnlmError` naming the file and the fix.
        """
        path = Path(path)
        if not path.is_dir():
            raise KnnlmError(f"datastore folder {path} does not exist; build it with `knnlm datastore build`")
        meta_path = path / META_FILE
        if not meta_path.exists():
            if (path / PROGRESS_FILE).exists():
                raise KnnlmError(
                    f"{path} is a half-written datastore ({PROGRESS_FILE} present, {META_FILE} missing): "
                    f"rerun `knnlm datastore build` with the same options to resume it"
                )
            raise KnnlmError(f"{meta_path} is missing: {path} is not a complete knnlm datastore; rebuild it")
        meta = read_json(meta_path, "datastore metadata")
        if meta.get("format") != DATASTORE_FORMAT:
            raise KnnlmError(f"{meta_path} is not knnlm datastore metadata (format {meta.get('format')!r})")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise KnnlmError(
                f"{meta_path} has format version {meta['format_version']}, newer than this knnlm "
                f"({code_version()}) reads; upgrade knnlm"
            )
        if meta.get("datastore_id") != datastore_id(meta):
            raise KnnlmError(f"{meta_path} was edited after the build (its id no longer matches); rebuild it")
        n, d = int(meta["num_keys"]), int(meta["key_dim"])
        keys = _load_npy(path / KEYS_FILE, "datastore keys")
        vals = _load_npy(path / VALS_FILE, "datastore values")
        _check_array(path / KEYS_FILE, keys, (n, d), meta["key_dtype"])
        _check_array(path / VALS_FILE, vals, (n,), meta["val_dtype"])
        positions = None
        if meta.get("has_positions"):
            positions = _load_npy(path / POSITIONS_FILE, "split positions of the entries")
            _check_array(path / POSITIONS_FILE, positions, (n,), "int64")
        if in_memory:
            keys, vals = np.array(keys), np.array(vals)
        store = cls(path, meta, keys, vals, positions)
        store.check_compatible(
            key_type=key_type,
            key_dim=key_dim,
            dictionary_sha256=dictionary_sha256,
            checkpoint_sha256=checkpoint_sha256,
        )
        return store

    @property
    def num_keys(self) -> int:
        return int(self.meta["num_keys"])

    @property
    def key_dim(self) -> int:
        return int(self.meta["key_dim"])

    @property
    def key_type(self) -> str:
        return str(self.meta["key_type"])

    @property
    def datastore_id(self) -> str:
        return str(self.meta["datastore_id"])

    def __len__(self) -> int:
        return self.num_keys

    def load_keys_if_they_fit(self, max_bytes: int | None = None, dtype: np.dtype | type | None = None) -> bool:
        """Read the keys into memory when they take at most ``max_bytes`` (default: half the free RAM).

        Re-scoring gathers ~k scattered rows per query: from a memory map each row
        is a page fault, which made re-scoring cost several times the search itself;
        one sequential read is seconds. With ``dtype`` (float32 for exact search) the
        keys are held converted when that copy fits too, so that neither the search's
        chunks nor the gathered rows are converted again for every query batch.
        Larger datastores stay memory-mapped. Returns whether the keys are in memory now.
        """
        in_memory = not isinstance(self.keys, np.memmap)
        if in_memory and (dtype is None or self.keys.dtype == dtype):
            return True  # nothing to do: no look at the free memory on every search call
        budget = available_memory() // 2 if max_bytes is None else max_bytes
        if dtype is not None and self.keys.dtype != dtype:
            converted = self.keys.size * np.dtype(dtype).itemsize
            if converted <= budget + (self.keys.nbytes if in_memory else 0):
                self.keys = np.asarray(self.keys, dtype=dtype)
                return True
        if in_memory:
            return True
        if self.keys.nbytes > budget:
            return False
        self.keys = np.array(self.keys)
        return True

    def values_of(self, ids: np.ndarray) -> np.ndarray:
        """Next-token ids (int64) of the entries ``ids``; −1 where an id is −1 (a neighbour not found)."""
        ids = np.asarray(ids)
        return np.where(ids >= 0, np.asarray(self.vals)[np.maximum(ids, 0)], -1).astype(np.int64)

    def positions(self) -> np.ndarray:
        """Split position (index in the target stream) of every entry."""
        if self._positions is not None:
            return self._positions
        first = int(self.meta.get("first_position", 0))
        return np.arange(first, first + self.num_keys, dtype=np.int64)

    def positions_of(self, ids: np.ndarray) -> np.ndarray:
        """Split positions of the entries ``ids`` (without materializing all N of them)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._positions is not None:
            return np.asarray(self._positions[ids], dtype=np.int64)
        return int(self.meta.get("first_position", 0)) + ids

    def split_source(self) -> SplitSource:
        """The split whose target stream the entries come from: entry ``i`` is its token ``positions()[i]``.

        What a viewer needs to show a neighbour's context. Datastores written by
        :func:`write_datastore` (keys from elsewhere) record no split.
        """
        source, paths = self.meta.get("source") or {}, self.meta.get("paths") or {}
        fields = {"data": paths.get("data"), "split": source.get("split"), "data_sha256": source.get("data_sha256")}
        missing = [name for name, value in fields.items() if not value]
        if missing:
            raise KnnlmError(
                f"{self.path / META_FILE} records no {', '.join(missing)} of the split its entries come from; "
                f"rebuild the datastore with `knnlm datastore build` (knnlm >= 0.1.0) to inspect contexts"
            )
        return SplitSource(str(fields["data"]), str(fields["split"]), str(fields["data_sha256"]), source.get("units"))

    def check_compatible(
        self,
        *,
        key_type: str | None = None,
        key_dim: int | None = None,
        dictionary_sha256: str | None = None,
        checkpoint_sha256: str | None = None,
    ) -> None:
        """Refuse use with a model whose key type, key size, vocabulary or checkpoint differ."""
        where = str(self.path / META_FILE)
        if key_type is not None and key_type != self.key_type:
            raise KnnlmError(
                f"{where}: the datastore holds {self.key_type!r} keys but {key_type!r} keys were asked for; "
                f"use the datastore built with --key-types {key_type}"
            )
        if key_dim is not None and key_dim != self.key_dim:
            raise KnnlmError(
                f"{where}: the datastore's keys have dimension {self.key_dim} but the model's "
                f"{self.key_type} key has dimension {key_dim}; build it from this checkpoint"
            )
        source = self.meta.get("source", {})
        if dictionary_sha256 is not None and source.get("dictionary_sha256") != dictionary_sha256:
            raise KnnlmError(
                f"{where}: the datastore was built with another dictionary (fingerprint "
                f"{str(source.get('dictionary_sha256'))[:12]}, expected {dictionary_sha256[:12]}); its "
                f"values are ids of another vocabulary; rebuild it from the same data-bin"
            )
        if checkpoint_sha256 is not None and source.get("checkpoint_sha256") != checkpoint_sha256:
            raise KnnlmError(
                f"{where}: the datastore was built from another checkpoint (fingerprint "
                f"{str(source.get('checkpoint_sha256'))[:12]}, expected {checkpoint_sha256[:12]}); "
                f"rebuild it from this checkpoint"
            )

    def __repr__(self) -> str:
        return f"Datastore({str(self.path)!r}, N={self.num_keys}, D={self.key_dim}, key_type={self.key_type!r})"


def _check_array(path: Path, arr: np.ndarray, shape: tuple[int, ...], dtype: str) -> None:
    if tuple(arr.shape) != shape or arr.dtype != np.dtype(dtype):
        raise KnnlmError(
            f"{path} holds {arr.dtype}{list(arr.shape)} but {META_FILE} says {dtype}{list(shape)}: "
            f"the files do not belong together (changed after the build); rebuild the datastore"
        )


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class OutputState:
    """What a build finds in its output folder."""

    status: Literal["new", "resume", "complete"]
    next_unit: int = 0
    rows_done: int = 0


def _clear(path: Path) -> None:
    """Remove a datastore's files, metadata first so the folder reads as incomplete at once."""
    for name in (META_FILE, PROGRESS_FILE, *DATA_FILES):
        (path / name).unlink(missing_ok=True)


def prepare_output(path: Path, meta: dict[str, Any], resume_spec: dict[str, Any], overwrite: bool) -> OutputState:
    """Decide whether a build into ``path`` starts, resumes, or is already done; refuse conflicts.

    ``meta`` is the finalized metadata the build will write; ``resume_spec`` the
    settings a resumed build must share with the interrupted one. Nothing is
    deleted unless ``overwrite``.
    """
    path.mkdir(parents=True, exist_ok=True)
    meta_path, progress_path = path / META_FILE, path / PROGRESS_FILE
    if meta_path.exists():
        old = read_json(meta_path, "datastore metadata")
        if old.get("datastore_id") == meta["datastore_id"] and not overwrite:
            Datastore.open(path)  # the files must still match their metadata
            return OutputState("complete")
        if not overwrite:
            raise KnnlmError(
                f"{path} already holds a complete datastore built with other settings "
                f"({describe_differences(old, meta)}); choose another output folder or pass --overwrite"
            )
        _clear(path)
        return OutputState("new")
    if progress_path.exists():
        progress = read_json(progress_path, "build progress")
        if progress.get("resume_spec") == resume_spec and not overwrite:
            if progress.get("next_unit") is None:  # stopped while preallocating: nothing written to keep
                _clear(path)
                return OutputState("new")
            for name in (KEYS_FILE, VALS_FILE):
                if not (path / name).exists():
                    raise KnnlmError(f"{path / name} is missing from a half-written build; pass --overwrite")
            return OutputState("resume", int(progress["next_unit"]), int(progress["rows_done"]))
        if not overwrite:
            raise KnnlmError(
                f"{path} holds a half-written build with other settings "
                f"({describe_differences(progress.get('resume_spec', {}), resume_spec)}); rerun with the original "
                f"options to resume it, or pass --overwrite to start afresh"
            )
        _clear(path)
        return OutputState("new")
    leftovers = [name for name in DATA_FILES if (path / name).exists()]
    if leftovers and not overwrite:
        raise KnnlmError(
            f"{path} holds {', '.join(leftovers)} without {META_FILE} or {PROGRESS_FILE} (unknown origin); "
            f"choose another output folder or pass --overwrite"
        )
    _clear(path)
    return OutputState("new")


class ChunkWriter:
    """Fills a datastore's preallocated ``keys.npy``/``vals.npy`` and commits progress.

    Rows go through :class:`knnlm.io.NpyRowWriter` (file writes at their offsets,
    not a writable memmap), so the resident memory of a build stays flat however
    large N is.
    """

    def __init__(
        self,
        path: Path,
        num_rows: int,
        key_dim: int,
        state: OutputState,
        resume_spec: dict[str, Any],
        positions: np.ndarray | None = None,
    ) -> None:
        self.path = path
        self.num_rows = num_rows
        self.key_dim = key_dim
        resume = state.status != "new"
        if not resume:
            self._record(resume_spec, None, 0)  # claimed before any file appears: a stop now is still resumable
            if positions is not None:
                np.save(path / POSITIONS_FILE, positions.astype(np.int64))
        arrays = {
            "keys": (path / KEYS_FILE, (num_rows, key_dim), KEY_DTYPE),
            "vals": (path / VALS_FILE, (num_rows,), VAL_DTYPE),
        }
        if resume:  # the files of the interrupted build must still be the ones it preallocated
            for file, shape, dtype in arrays.values():
                _check_array(file, _load_npy(file, "preallocated datastore file"), shape, dtype)
        self._rows = NpyRowWriter(arrays, resume=resume)

    def write(self, row: int, keys: np.ndarray, vals: np.ndarray) -> None:
        """Write ``len(keys)`` rows starting at ``row``."""
        if len(keys) != len(vals) or row + len(keys) > self.num_rows:
            raise ValueError(f"rows [{row}, {row + len(keys)}) do not fit the datastore of {self.num_rows}")
        self._rows.write("keys", row, keys)
        self._rows.write("vals", row, vals)

    def _sync(self) -> None:
        self._rows.sync()

    def commit(self, resume_spec: dict[str, Any], next_unit: int, rows_done: int) -> None:
        """Make the rows written so far durable, then record where a resumed build continues."""
        self._sync()
        self._record(resume_spec, next_unit, rows_done)

    def _record(self, resume_spec: dict[str, Any], next_unit: int | None, rows_done: int) -> None:
        """Write ``progress.json``; ``next_unit`` None: the files are being preallocated, nothing is kept yet."""
        write_json_atomic(
            self.path / PROGRESS_FILE,
            {
                "resume_spec": resume_spec,
                "next_unit": next_unit,
                "rows_done": rows_done,
                "updated": utc_now(),
            },
        )

    def finish(self, meta: dict[str, Any]) -> None:
        """Sync the data, write ``meta.json`` (last), drop the progress file."""
        self._sync()
        self.close()
        write_json_atomic(self.path / META_FILE, meta)
        (self.path / PROGRESS_FILE).unlink(missing_ok=True)

    def close(self) -> None:
        self._rows.close()

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_datastore(
    path: str | os.PathLike,
    keys: np.ndarray,
    vals: np.ndarray,
    *,
    key_type: str,
    source: dict[str, Any],
    positions: np.ndarray | None = None,
    overwrite: bool = False,
    chunk_rows: int = 1 << 18,
) -> Datastore:
    """Write in-memory (or memory-mapped) ``keys``/``vals`` as a datastore folder.

    For keys that do not come from a fairseq checkpoint (synthetic benchmarks,
    keys produced by other code). ``source`` says where they come from; the id
    also covers a hash of the content.
    """
    path = Path(path)
    keys = np.asarray(keys)
    vals = np.asarray(vals)
    if keys.ndim != 2 or vals.shape != (len(keys),):
        raise KnnlmError(f"keys must be [N, D] and vals [N]; got {keys.shape} and {vals.shape}")
    n, d = keys.shape
    digest = hashlib.sha256()
    for start in range(0, n, chunk_rows):
        digest.update(np.ascontiguousarray(keys[start : start + chunk_rows], dtype=KEY_DTYPE).tobytes())
    digest.update(np.ascontiguousarray(vals, dtype=VAL_DTYPE).tobytes())
    if positions is not None:
        digest.update(np.ascontiguousarray(positions, dtype=np.int64).tobytes())
    content = digest.hexdigest()
    meta = finalize_meta(
        {
            "num_keys": n,
            "key_dim": d,
            "key_type": key_type,
            "key_dtype": KEY_DTYPE,
            "val_dtype": VAL_DTYPE,
            "has_positions": positions is not None,
            "first_position": 0,
            "source": dict(source),
            "content_sha256": content,
        }
    )
    spec = {"content_sha256": content}
    state = prepare_output(path, meta, spec, overwrite)
    if state.status == "complete":
        return Datastore.open(path)
    with ChunkWriter(path, n, d, state, spec, positions) as writer:
        for start in range(0, n, chunk_rows):
            writer.write(start, keys[start : start + chunk_rows], vals[start : start + chunk_rows])
        writer.finish(meta)
    return Datastore.open(path)
