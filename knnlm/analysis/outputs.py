"""Writing an analysis' numbers: strict JSON (written last, atomically) and CSV tables.

Every analysis writes ``<out>/<name>.png``, ``<name>.csv`` (one row per bin, word or
bucket) and ``<name>.json`` (settings, inputs and summary numbers). The JSON comes
last, like every ``meta.json`` here, so a folder whose JSON exists is complete.
Infinities are written as the strings ``"inf"``/``"-inf"`` and undefined values
(NaN, e.g. a correlation over constant data) as ``null``: strict JSON has neither.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from knnlm.io import portable_paths, write_json_atomic


def to_json(value: Any) -> Any:
    """``value`` with numpy types, paths, dataclasses and non-finite floats made strict-JSON safe."""
    if is_dataclass(value) and not isinstance(value, type):
        return to_json(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [to_json(v) for v in value.tolist()]
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    return value


def write_json(path: Path, obj: Mapping[str, Any]) -> Path:
    """Write ``obj`` as strict JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, portable_paths(to_json(obj)))
    return path


def _cell(value: Any) -> Any:
    value = to_json(value)
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """Write a CSV table (header + rows) through a temp file and a rename; empty cells are undefined values."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for row in rows:
                if len(row) != len(columns):
                    raise ValueError(f"CSV row has {len(row)} cells for {len(columns)} columns")
                writer.writerow([_cell(v) for v in row])
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
