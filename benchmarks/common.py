"""Helpers shared by the benchmark scripts (imported as a sibling module when a script runs)."""

from __future__ import annotations

import platform
import statistics
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name, for the results."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def spread(values: list[float], digits: int = 4) -> dict[str, Any]:
    """Median, min, max and every value."""
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "per_rep": [round(v, digits) for v in values],
    }
