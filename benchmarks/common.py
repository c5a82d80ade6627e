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


def ratio(num: list[float], den: list[float], digits: int | None = None) -> dict[str, float]:
    """Median, min and max of the per-repetition ratios ``num[i] / den[i]`` (rounded if ``digits``)."""
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    stats = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return stats if digits is None else {k: round(v, digits) for k, v in stats.items()}
