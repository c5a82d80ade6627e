"""Result lines as the report sees them: flat knobs to select on, metrics to show.

A line is any JSON object with a ``knobs`` and a ``metrics`` object (the score
phase writes ``"schema": "knnlm.score/1"``; other phases may add their own
schemas). Nested knobs are flattened with dots (``labels.seed``, ``index.nprobe``)
so that tables select on them by name; ``"inf"`` metrics become ``math.inf``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knnlm.errors import KnnlmError

#: relative tolerance under which two float knobs are the same setting
FLOAT_RTOL = 1e-9


@dataclass(frozen=True)
class ResultLine:
    """One result: flattened knobs, metrics (floats may be inf), provenance, and where it was read."""

    knobs: dict[str, Any]
    metrics: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)
    schema: str = ""
    source: str = ""

    def metric(self, name: str) -> Any:
        """A metric by name; ``"a|b"`` is the first of ``a``, ``b`` the line has (rows mixing schemas)."""
        for part in name.split("|"):
            if part in self.metrics:
                return self.metrics[part]
        return None


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"labels": {"seed": 1}}`` -> ``{"labels.seed": 1}``; lists become tuples (hashable)."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if value:
                out.update(flatten(value, f"{name}."))
            else:
                out[name] = None
        elif isinstance(value, list):
            out[name] = tuple(value)
        else:
            out[name] = value
    return out


def _number(value: Any) -> Any:
    if value == "inf":
        return math.inf
    if value == "-inf":
        return -math.inf
    return value


def parse_line(obj: Any, source: str) -> ResultLine:
    """Check and flatten one decoded JSON line."""
    if not isinstance(obj, dict) or not isinstance(obj.get("knobs"), dict) or not isinstance(obj.get("metrics"), dict):
        raise KnnlmError(f"{source}: not a result line (needs 'knobs' and 'metrics' objects)")
    return ResultLine(
        knobs=flatten(obj["knobs"]),
        metrics={k: _number(v) for k, v in obj["metrics"].items()},
        provenance=dict(obj.get("provenance") or {}),
        schema=str(obj.get("schema", "")),
        source=source,
    )


def load_results(paths: Iterable[str | os.PathLike[str]]) -> list[ResultLine]:
    """Read JSON-lines files in order (later lines are newer re-runs); blank lines are skipped."""
    lines: list[ResultLine] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise KnnlmError(f"results file {path} does not exist; run `knnlm score --out {path}` first")
        with path.open(encoding="utf-8") as f:
            for lineno, text in enumerate(f, 1):
                if not text.strip():
                    continue
                source = f"{path}:{lineno}"
                try:
                    obj = json.loads(text)
                except ValueError as err:
                    raise KnnlmError(f"{source}: invalid JSON ({err}); fix or delete that line") from err
                lines.append(parse_line(obj, source))
    return lines


def same_value(a: Any, b: Any) -> bool:
    """Knob equality with a float tolerance (0.1 from a range equals 0.1 typed by hand)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=FLOAT_RTOL, abs_tol=1e-12)
    return a == b


def knob_matches(line: ResultLine, key: str, wanted: Any) -> bool:
    """A knob equals ``wanted``; a tuple/list/set ``wanted`` means any of its values; None means unset."""
    value = line.knobs.get(key)
    if isinstance(wanted, tuple | list | set | frozenset):
        return any(same_value(value, w) for w in wanted)
    return same_value(value, wanted)


def select(lines: Sequence[ResultLine], where: Mapping[str, Any]) -> list[ResultLine]:
    """Lines whose knobs match every entry of ``where``."""
    return [line for line in lines if all(knob_matches(line, k, v) for k, v in where.items())]


def in_prefixes(key: str, prefixes: Iterable[str]) -> bool:
    """``key`` is one of ``prefixes`` or below one of them (``labels.seed`` is below ``labels``)."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def differing_knobs(lines: Sequence[ResultLine], ignore: Iterable[str] = ()) -> list[str]:
    """Knob names whose values are not the same across ``lines`` (``ignore``: names or dotted prefixes)."""
    ignore = tuple(ignore)
    keys = sorted({k for line in lines for k in line.knobs if not in_prefixes(k, ignore)})
    first = lines[0].knobs if lines else {}
    return [k for k in keys if any(not same_value(line.knobs.get(k), first.get(k)) for line in lines[1:])]


def best_line(lines: Sequence[ResultLine], where: Mapping[str, Any], metric: str) -> ResultLine | None:
    """The matching line with the lowest finite ``metric`` (None when no line has one).

    This is how a knob is tuned on valid from lines already written (e.g. τ by ``valid_interp_ppl``):
    re-runs of one setting count once (the last line read), and ties go to the first setting read.
    """
    latest: dict[tuple[tuple[str, str], ...], ResultLine] = {}
    for line in select(lines, where):
        latest[tuple(sorted((k, repr(v)) for k, v in line.knobs.items()))] = line
    best: tuple[float, ResultLine] | None = None
    for line in latest.values():
        value = line.metric(metric)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            continue
        if best is None or value < best[0]:
            best = (value, line)
    return None if best is None else best[1]


def best_setting(lines: Sequence[ResultLine], where: Mapping[str, Any], knob: str, metric: str) -> Any:
    """``knob``'s value on the :func:`best_line` among the lines that set it (None when there is none)."""
    line = best_line([line for line in lines if knob in line.knobs], where, metric)
    return None if line is None else line.knobs[knob]


@dataclass(frozen=True)
class Pick:
    """The outcome of selecting lines for one table cell or plot point."""

    status: str  # "ok" | "missing" | "ambiguous"
    lines: tuple[ResultLine, ...] = ()
    differing: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def pick(lines: Sequence[ResultLine], where: Mapping[str, Any], aggregate_over: Sequence[str] = ()) -> Pick:
    """The line(s) for one cell: exactly one setting, or one per value of ``aggregate_over``.

    Lines that agree on every knob are re-runs: the last one read wins. Lines that
    differ in a knob the cell does not fix (and that is not aggregated over) make the
    cell ambiguous rather than silently choosing one.
    """
    matched = select(lines, where)
    if not matched:
        return Pick("missing")
    differing = differing_knobs(matched, aggregate_over)
    if differing:
        return Pick("ambiguous", tuple(matched), tuple(differing))
    if not aggregate_over:
        return Pick("ok", (matched[-1],))
    latest: dict[tuple[Any, ...], ResultLine] = {}
    for line in matched:
        key = tuple(sorted((k, repr(v)) for k, v in line.knobs.items() if in_prefixes(k, aggregate_over)))
        latest[key] = line
    return Pick("ok", tuple(latest.values()))
