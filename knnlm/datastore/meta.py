"""Metadata of datastores and indexes: their format names and the checks readers run.

Every artifact (datastore folder, index file) gets its metadata written *last*
and atomically (:func:`knnlm.io.write_json_atomic`), so a reader that finds it knows
the data files are complete; a reader that does not find it refuses the artifact.
An artifact's *id* is the :func:`~knnlm.io.fingerprint` of the canonical JSON of the
fields that determine its content, so two builds with the same inputs and settings
get the same id.
"""

from __future__ import annotations

from typing import Any

from knnlm.errors import KnnlmError

DATASTORE_FORMAT = "knnlm.datastore"
INDEX_FORMAT = "knnlm.faiss_index"
FORMAT_VERSION = 1

def require_equal(name: str, found: Any, expected: Any, where: str, fix: str) -> None:
    """Raise a :class:`KnnlmError` naming ``where`` and ``fix`` when ``found != expected``."""
    if found != expected:
        raise KnnlmError(f"{where}: {name} is {found!r} but {expected!r} was expected; {fix}")
