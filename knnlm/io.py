"""Atomic, durable JSON writes: every ``meta.json`` of the project goes through here.

Readers see either the old file or the whole new one, never half of it: the JSON is
written to a hidden temp file in the same folder, synced, renamed onto the target,
and the rename is synced too.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomic(
    path: str | os.PathLike, obj: Any, *, sort_keys: bool = True, allow_nan: bool = True
) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (``allow_nan=False`` for strict JSON)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=sort_keys, allow_nan=allow_nan)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


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
