"""Helpers shared by the benchmark scripts (imported as a sibling module when a script runs)."""

from __future__ import annotations

import statistics
from typing import Any

from knnlm.models.devices import cpu_model  # noqa: F401  (re-exported for the scripts)


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
