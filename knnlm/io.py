"""Artifact I/O shared by every package: atomic JSON, rows streamed into ``.npy`` files, fingerprints.

Readers see either the old JSON file or the whole new one, never half of it: the JSON
is written to a hidden temp file in the same folder, synced, renamed onto the target,
and the rename is synced too. Large arrays are preallocated and filled by
:class:`NpyRowWriter`; a progress record written after :meth:`NpyRowWriter.sync`
lets an interrupted writer resume (:func:`read_progress`). Fingerprints are SHA-256
hex digests of files (:func:`sha256_files`), of canonical JSON (:func:`fingerprint`)
and of vocabularies (:func:`dictionary_fingerprint`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from knnlm import __version__
from knnlm.errors import KnnlmError

_HASH_BLOCK = 1 << 24


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() gives a new file


def code_version() -> str:
    """The ``knnlm`` version recorded in every artifact."""
    return __version__


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """Read a metadata file; a missing or corrupt one is a :class:`KnnlmError` naming ``what``."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise KnnlmError(f"{path} does not exist ({what})") from None
    except (OSError, json.JSONDecodeError) as err:
        raise KnnlmError(f"{path} is not readable JSON ({what}): {err}; rebuild the artifact") from None
    if not isinstance(obj, dict):
        raise KnnlmError(f"{path} does not hold a JSON object ({what}); rebuild the artifact")
    return obj


def fingerprint(obj: Any) -> str:
    """SHA-256 of the canonical JSON of ``obj``: the id of the content it describes."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def sha256_files(paths: Iterable[str | os.PathLike]) -> str:
    """SHA-256 over the bytes of ``paths`` in order (streamed; files of any size)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                digest.update(block)
    return digest.hexdigest()


def dictionary_fingerprint(dictionary: Any) -> str:
    """SHA-256 of a vocabulary's symbols in id order.

    Duck-typed on ``.symbols`` (fairseq ``Dictionary``) so this module does not
    import fairseq. Counts are left out: they do not change what an id means.
    """
    symbols = getattr(dictionary, "symbols", dictionary)
    return hashlib.sha256("\n".join(map(str, symbols)).encode("utf-8")).hexdigest()


def describe_differences(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> str:
    """``key: old -> new`` for the first ``limit`` differing keys (long values cut), for refusal messages."""

    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 24 else text[:20] + "…"

    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {short(old.get(k))} -> {short(new.get(k))}" for k in keys[:limit]) or "none"


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: readers see the old file or the whole new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600; an artifact's files all get the same mode
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json_atomic(
    path: str | os.PathLike, obj: Any, *, sort_keys: bool = True, allow_nan: bool = True
) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (``allow_nan=False`` for strict JSON)."""
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, allow_nan=allow_nan)
    write_text_atomic(path, text + "\n")


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class NpyRowWriter:
    """Fills preallocated ``.npy`` files row range by row range, with plain file writes.

    Every artifact that streams rows (datastore keys, cache queries, retrieved
    neighbours) goes through here. Rows are written at their byte offsets with
    ``pwrite`` rather than through a writable memmap: a memmap dirties pages that
    the kernel must fault in and that ``flush`` syncs in full, which made cache
    dumps spend half their time in the kernel; resident memory also stays flat.
    :meth:`sync` makes what was written durable (before progress is recorded).

    ``arrays`` maps a name to ``(path, shape, dtype)``. Without ``resume`` every file
    is created anew (sparse, so preallocation costs nothing); with ``resume`` each
    must exist with that shape and dtype, as the interrupted writer left it.
    """

    def __init__(self, arrays: dict[str, tuple[Path, tuple[int, ...], str]], resume: bool = False) -> None:
        self._files: dict[str, Any] = {}
        self._layout: dict[str, tuple[int, int, Any]] = {}  # name -> (data offset, bytes per row, dtype)
        try:
            for name, (path, shape, dtype) in arrays.items():
                path, dtype = Path(path), np.dtype(dtype)
                if not resume:
                    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
                    del arr
                elif not _npy_matches(path, shape, dtype):
                    raise KnnlmError(
                        f"{path} is not the {dtype} {list(shape)} array its progress record expects; delete "
                        f"{path.parent / 'progress.json'} to start this output over"
                    )
                offset = _npy_data_offset(path)
                row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
                self._layout[name] = (offset, row_bytes, dtype)
                self._files[name] = open(path, "r+b")  # noqa: SIM115 (closed in close())
        except BaseException:
            self.close()
            raise

    def write(self, name: str, row: int, values: Any) -> None:
        """Write ``values`` (rows of the array's shape) starting at ``row``."""
        offset, row_bytes, dtype = self._layout[name]
        data = np.ascontiguousarray(values, dtype=dtype)
        os.pwrite(self._files[name].fileno(), memoryview(data).cast("B"), offset + row * row_bytes)

    def sync(self) -> None:
        for f in self._files.values():
            os.fsync(f.fileno())

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> NpyRowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _npy_header(path: Path) -> tuple[tuple[int, ...], Any, bool, int]:
    """(shape, dtype, fortran_order, data offset) of an ``.npy`` file, without mapping it."""
    import numpy as np

    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        return tuple(shape), dtype, fortran, f.tell()


def _npy_matches(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> bool:
    try:
        got_shape, got_dtype, fortran, offset = _npy_header(path)
    except (OSError, ValueError):
        return False
    size = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return got_shape == tuple(shape) and got_dtype == dtype and not fortran and path.stat().st_size == size


def _npy_data_offset(path: Path) -> int:
    return _npy_header(path)[3]


def read_progress(path: str | os.PathLike, spec: Any, key: str = "next") -> int:
    """The unit an interrupted writer of the same ``spec`` stopped at (0 if none or another spec)."""
    try:
        progress = json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return int(progress.get(key, 0)) if progress.get("spec") == spec else 0


PATH_FIELDS = frozenset(
    {"path", "checkpoint", "valid_cache", "test_cache", "datastore_path", "lm_cache", "clusters", "cache",
     "dictionary", "datastore", "data", "index", "data_bin", "training_stream"}
)


def portable_paths(obj: Any) -> Any:
    """``obj`` with every absolute path under a path field made relative to the working directory.

    Result lines are committed and shared: they name artifacts as seen from where the
    command ran (``runs/x/cache/valid``, ``../datastores/att``), never by this machine's
    absolute paths. Other values (fingerprints, hub names) are left as they are.
    """
    if isinstance(obj, dict):
        return {
            key: os.path.relpath(value) if key in PATH_FIELDS and isinstance(value, str) and os.path.isabs(value)
            else portable_paths(value)
            for key, value in obj.items()
        }
    if isinstance(obj, list):
        return [portable_paths(value) for value in obj]
    return obj


LOCK_FILE = ".knnlm.lock"


class WriterLock:
    """The one writer of an artifact: an exclusive ``flock`` on a lock file, held while a command writes.

    A second writer is refused at once with the holder's pid and command. The kernel
    drops the lock when its holder dies (even by ``kill -9``), so a lock left behind is
    never stale: the next writer takes it over and resumes from the artifact's progress.
    """

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        self.path = Path(path)  # the lock file
        self.what = what
        self._fd: int | None = None

    @classmethod
    def for_folder(cls, folder: str | os.PathLike, what: str) -> WriterLock:
        return cls(Path(folder) / LOCK_FILE, what)

    def __enter__(self) -> WriterLock:
        import fcntl
        import sys

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
        except OSError as err:  # a file where a folder belongs, a read-only or missing parent, ...
            raise KnnlmError(
                f"cannot write {self.what}: {err.strerror} ({err.filename}); choose another output"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            try:
                info = json.loads(holder)
                who = f"pid {info['pid']}: {info['command']}"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise KnnlmError(
                f"{self.what} is being written by another knnlm process ({who}); wait for it to finish or "
                "write elsewhere"
            ) from None
        record = json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv)[:500], "since": utc_now()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode("utf-8"), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            import fcntl

            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def append_jsonl(path: str | os.PathLike, record: Any) -> None:
    """Append one strict-JSON line to a results file, under an exclusive lock of that file.

    Concurrent sweep jobs append to one file: each line goes in with one write while
    the file is locked, so lines never interleave. A torn last line (a writer killed
    mid-write, a full disk) is cut off before the new line is added, with a warning,
    so it can never merge with the next record into one unreadable line.
    """
    import fcntl
    import logging

    line = (json.dumps(record, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, _FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            tail_start = _last_line_start(fd, size)
            logging.getLogger(__name__).warning(
                "%s ended in a torn line (%d bytes, no newline): removed before appending", path, size - tail_start
            )
            os.ftruncate(fd, tail_start)
        os.write(fd, line)
    finally:
        os.close(fd)  # also releases the lock


def _last_line_start(fd: int, size: int, block: int = 1 << 16) -> int:
    """Offset just after the last newline before ``size`` (0 if there is none)."""
    end = size
    while end > 0:
        start = max(0, end - block)
        chunk = os.pread(fd, end - start, start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        end = start
    return 0
