"""Metadata of on-disk artifacts: atomic JSON, fingerprints, and the checks readers run.

Every artifact (datastore folder, index file) gets its metadata written *last*
and atomically (temp file + ``os.replace``), so a reader that finds it knows the
data files are complete; a reader that does not find it refuses the artifact.
Fingerprints are SHA-256 hex digests; an artifact's *id* is the fingerprint of
the canonical JSON of the fields that determine its content, so two builds with
the same inputs and settings get the same id.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from knnlm import __version__
from knnlm.errors import KnnlmError

DATASTORE_FORMAT = "knnlm.datastore"
INDEX_FORMAT = "knnlm.faiss_index"
FORMAT_VERSION = 1

_HASH_BLOCK = 1 << 24


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


def require_equal(name: str, found: Any, expected: Any, where: str, fix: str) -> None:
    """Raise a :class:`KnnlmError` naming ``where`` and ``fix`` when ``found != expected``."""
    if found != expected:
        raise KnnlmError(f"{where}: {name} is {found!r} but {expected!r} was expected; {fix}")
