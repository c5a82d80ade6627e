"""Markdown tables from result lines: a declarative spec, and a generic "every line" table.

A :class:`TableSpec` says which knobs are fixed, which rows exist (each a set of
knobs), and which metrics the columns show. A cell shows one line's metric, or the
mean ± std over the lines that differ only in ``aggregate_over`` knobs (e.g. seeds).
Cells without a line read "missing" and cells whose lines differ in an unfixed knob
read "ambiguous"; both are listed under the table, nothing is filled in.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from knnlm.report.lines import Pick, ResultLine, in_prefixes, pick, select
from knnlm.report.registry import RenderContext, Rendered, register

MISSING = "missing"
AMBIGUOUS = "ambiguous"


def fmt_number(value: Any, digits: int = 2) -> str:
    """A metric for a table: fixed decimals, ``∞`` for infinity, ``–`` for none."""
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.{digits}f}"


def fmt_mean_std(values: Sequence[float], digits: int = 2) -> str:
    """``mean ± std (n=…)`` over seeds; a single value is shown as is."""
    if len(values) == 1:
        return fmt_number(values[0], digits)
    if any(math.isinf(v) for v in values):
        return f"∞ (n={len(values)})"
    mean, std = statistics.fmean(values), statistics.stdev(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f} (n={len(values)})"


@dataclass(frozen=True)
class Column:
    """A metric column; ``zero_mass`` names a metric counted next to infinite values."""

    header: str
    metric: str
    digits: int = 2
    zero_mass: str | None = None

    def cell(self, lines: Sequence[ResultLine]) -> str:
        values = [line.metric(self.metric) for line in lines]
        if any(v is None for v in values):
            return "–"
        text = fmt_mean_std(values, self.digits)
        if self.zero_mass and len(lines) == 1 and math.isinf(values[0]):
            line = lines[0]
            text += f" ({line.metric(self.zero_mass)}/{line.metric('n_tokens')} tokens at zero mass)"
        return text


@dataclass(frozen=True)
class Row:
    """A table row: its label cells and the knobs that select its line(s)."""

    labels: tuple[str, ...]
    where: Mapping[str, Any]


@dataclass(frozen=True)
class TableSpec:
    """A table: fixed knobs, rows, metric columns; optionally a base-LM row and aggregation over seeds."""

    name: str
    title: str
    label_headers: tuple[str, ...]
    rows: tuple[Row, ...]
    columns: tuple[Column, ...]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    aggregate_over: tuple[str, ...] = ()
    base_lm: Column | None = None  # a first row showing this LM metric from the table's lines
    note: str = ""


def _describe(where: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in where.items())


def _cell_text(p: Pick, column: Column) -> str:
    if p.status == "missing":
        return MISSING
    if p.status == "ambiguous":
        return AMBIGUOUS
    return column.cell(p.lines)


def _base_lm_cell(picks: Sequence[Pick], column: Column, aggregate_over: Sequence[str]) -> tuple[str, str | None]:
    """The base LM metric shared by the table's lines, or a flag when they disagree."""
    lines = [line for p in picks if p.ok for line in p.lines]
    if not lines:
        return MISSING, "base LM: no line"
    by_model: dict[tuple[Any, ...], float] = {}
    for line in lines:
        model = tuple(line.knobs.get(k) for k in ("checkpoint", "split")) + tuple(
            (k, repr(v)) for k, v in sorted(line.knobs.items()) if in_prefixes(k, aggregate_over)
        )
        by_model[model] = line.metric(column.metric)
    values = list(by_model.values())
    if len(values) > 1 and not aggregate_over:
        if any(not math.isclose(v, values[0], rel_tol=1e-9) for v in values):
            return AMBIGUOUS, "base LM: the rows' lines come from different models or splits"
        values = values[:1]
    return fmt_mean_std(values, column.digits), None


def render_table(spec: TableSpec, lines: Sequence[ResultLine], ctx: RenderContext) -> Rendered:
    """Markdown for ``spec``; also written to ``<out_dir>/<name>.md``."""
    fixed = {**spec.fixed, **ctx.where}
    picks = [pick(lines, {**row.where, **fixed}, spec.aggregate_over) for row in spec.rows]
    header = [*spec.label_headers, *(c.header for c in spec.columns)]
    body: list[list[str]] = []
    missing: list[str] = []
    if spec.base_lm is not None:
        text, flag = _base_lm_cell(picks, spec.base_lm, spec.aggregate_over)
        cells = ["–"] * len(spec.columns)
        cells[0] = text
        body.append(["Base LM", *["–"] * (len(spec.label_headers) - 1), *cells])
        if flag:
            missing.append(flag)
    for row, p in zip(spec.rows, picks, strict=True):
        body.append([*row.labels, *(_cell_text(p, c) for c in spec.columns)])
        label = " / ".join(row.labels)
        if p.status == "missing":
            missing.append(f"{label}: no line with {_describe({**row.where, **fixed})}")
        elif p.status == "ambiguous":
            missing.append(
                f"{label}: {len(p.lines)} lines differ in {', '.join(p.differing)}; fix them with --where KNOB=VALUE"
            )
    align = ["---"] * len(spec.label_headers) + ["---:"] * len(spec.columns)
    out = [f"### {spec.title}", ""]
    fixed_text = _describe(fixed)
    out.append(f"Fixed: {fixed_text}." if fixed_text else "Fixed: nothing.")
    if spec.aggregate_over:
        out.append(f"Cells: mean ± sample std over {', '.join(spec.aggregate_over)}.")
    if spec.note:
        out.append(spec.note)
    out += ["", "| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(row) + " |" for row in body]
    if missing:
        out += ["", "Missing or ambiguous (not filled in):", *(f"- {m}" for m in missing)]
    markdown = "\n".join(out) + "\n"
    path = ctx.out_dir / f"{spec.name}.md"
    path.write_text(markdown, encoding="utf-8")
    return Rendered(spec.name, spec.title, markdown, [path], missing)


def table_renderer(spec: TableSpec) -> Callable[[Sequence[ResultLine], RenderContext], Rendered]:
    """Register ``spec`` as a renderer under its name."""

    def render(lines: Sequence[ResultLine], ctx: RenderContext) -> Rendered:
        return render_table(spec, lines, ctx)

    return register(spec.name, spec.title, "table")(render)


_RESULTS_KNOBS = (
    ("split", "split"),
    ("h_ds", "key_type"),
    ("⊗", "similarity"),
    ("mask", "mask_source"),
    ("score", "score_source"),
    ("k", "k"),
    ("τ", "temperature"),
    ("λ", "lambda"),
    ("fraction", "datastore_fraction"),
)
_RESULTS_METRICS = (
    ("λ used", "lambda_used"),
    ("LM", "lm_ppl"),
    ("kNN", "knn_ppl"),
    ("Interp.", "interp_ppl"),
    ("Oracle", "oracle_ppl"),
)


@register("results", "Every result line", "table")
def render_results(lines: Sequence[ResultLine], ctx: RenderContext) -> Rendered:
    """One row per line (after --where), for looking at a sweep before picking a paper table."""
    chosen = select(lines, ctx.where)
    label_keys = sorted({k for line in chosen for k in line.knobs if k.startswith("labels.")})
    header = [h for h, _ in _RESULTS_KNOBS] + [k.removeprefix("labels.") for k in label_keys]
    header += [h for h, _ in _RESULTS_METRICS]
    out = ["### Every result line", "", f"{len(chosen)} of {len(lines)} lines.", ""]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for line in chosen:
        cells = [fmt_number(line.knobs.get(k), 3) for _, k in _RESULTS_KNOBS]
        cells += [str(line.knobs.get(k, "–")) for k in label_keys]
        cells += [fmt_number(line.metric(m)) for _, m in _RESULTS_METRICS]
        out.append("| " + " | ".join(cells) + " |")
    markdown = "\n".join(out) + "\n"
    path = ctx.out_dir / "results.md"
    path.write_text(markdown, encoding="utf-8")
    return Rendered("results", "Every result line", markdown, [path], [])
