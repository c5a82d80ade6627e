"""Line plots from result lines: a metric against one knob, one line per series of knobs.

Figures are sized for a paper column (3.3 in wide, 8 pt text) and saved as PNG
with the Agg backend, so they render on machines without a display. Points whose
lines differ in a knob the figure does not fix are left out and listed, never
averaged or chosen silently.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from knnlm.report.lines import ResultLine, pick, same_value, select  # noqa: E402
from knnlm.report.registry import RenderContext, Rendered, register  # noqa: E402

COLUMN_WIDTH_IN = 3.3
FIGURE_HEIGHT_IN = 2.4
DPI = 300
STYLE = {
    "font.size": 8,
    "axes.labelsize": 8,
    "axes.titlesize": 8,
    "legend.fontsize": 6.5,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "lines.linewidth": 1.2,
    "lines.markersize": 3.5,
}


@dataclass(frozen=True)
class Series:
    """One plotted line: a legend label and the knobs that select its points."""

    label: str
    where: Mapping[str, Any]
    min_points: int = 1  # fewer points than this: not drawn (and listed)


@dataclass(frozen=True)
class FigureSpec:
    """``y`` (a metric) against ``x`` (a knob) for each series, with ``fixed`` knobs."""

    name: str
    title: str
    x: str
    y: str
    xlabel: str
    ylabel: str
    series: tuple[Series, ...]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    expect: tuple[str, ...] = ()  # label prefixes of which at least one series must be drawn
    baseline: str | None = "lm_ppl"  # metric drawn as a dashed horizontal line ("base LM")
    logx: bool | None = None  # None: log scale when x spans more than a factor of 10
    note: str = ""


def _series_points(
    spec: FigureSpec, series: Series, lines: Sequence[ResultLine], fixed: Mapping[str, Any]
) -> tuple[list[tuple[float, float]], list[str]]:
    where = {**series.where, **fixed}
    candidates = select(lines, where)
    xs: list[Any] = []
    for line in candidates:
        x = line.knobs.get(spec.x)
        if isinstance(x, int | float) and not any(same_value(x, seen) for seen in xs):
            xs.append(x)
    points, flags = [], []
    for x in sorted(xs):
        p = pick(candidates, {spec.x: x})
        if p.status == "ambiguous":
            flags.append(
                f"{series.label}, {spec.x}={x}: {len(p.lines)} lines differ in {', '.join(p.differing)}; "
                f"fix them with --where KNOB=VALUE"
            )
            continue
        y = p.lines[0].metric(spec.y)
        if isinstance(y, int | float) and math.isfinite(y):
            points.append((float(x), float(y)))
        else:
            flags.append(f"{series.label}, {spec.x}={x}: {spec.y} is {y} (not plotted)")
    return points, flags


def _baseline(spec: FigureSpec, lines: Sequence[ResultLine]) -> tuple[float | None, str | None]:
    if spec.baseline is None or not lines:
        return None, None
    values = {line.metric(spec.baseline) for line in lines}
    values.discard(None)
    if len(values) != 1:
        return None, f"base LM line not drawn: the plotted lines have {len(values)} different {spec.baseline}"
    value = values.pop()
    return (float(value), None) if math.isfinite(value) else (None, None)


def render_figure(spec: FigureSpec, lines: Sequence[ResultLine], ctx: RenderContext) -> Rendered:
    """Draw ``spec`` to ``<out_dir>/<name>.png`` (no file when there is nothing to draw)."""
    fixed = {**spec.fixed, **ctx.where}
    drawn: list[tuple[Series, list[tuple[float, float]]]] = []
    missing: list[str] = []
    used: list[ResultLine] = []
    for series in spec.series:
        points, flags = _series_points(spec, series, lines, fixed)
        missing += flags
        if len(points) >= series.min_points and points:
            drawn.append((series, points))
            used += select(lines, {**series.where, **fixed})
    drawn_labels = [s.label for s, _ in drawn]
    for prefix in spec.expect:
        if not any(label.startswith(prefix) for label in drawn_labels):
            missing.append(f"no series '{prefix}' (no lines with {spec.x} values for it)")
    fixed_text = ", ".join(f"{k}={v}" for k, v in fixed.items())
    md = [f"### {spec.title}", "", f"Fixed: {fixed_text}." if fixed_text else "Fixed: nothing."]
    if spec.note:
        md.append(spec.note)
    files = []
    if drawn:
        path = ctx.out_dir / f"{spec.name}.png"
        _plot(spec, drawn, _baseline(spec, used), path, missing)
        files.append(path)
        md += ["", f"![{spec.title}]({path.name})"]
    else:
        md += ["", "Not drawn: no result line matches this figure."]
    if missing:
        md += ["", "Missing or ambiguous (not drawn):", *(f"- {m}" for m in missing)]
    markdown = "\n".join(md) + "\n"
    return Rendered(spec.name, spec.title, markdown, files, missing)


def _plot(
    spec: FigureSpec,
    drawn: Sequence[tuple[Series, list[tuple[float, float]]]],
    baseline: tuple[float | None, str | None],
    path: Any,
    missing: list[str],
) -> None:
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH_IN, FIGURE_HEIGHT_IN))
        try:
            markers = "osD^vP*X"
            all_x = []
            for i, (series, points) in enumerate(drawn):
                xs, ys = zip(*points, strict=True)
                all_x += xs
                ax.plot(xs, ys, marker=markers[i % len(markers)], label=series.label)
            value, flag = baseline
            if flag:
                missing.append(flag)
            if value is not None:
                ax.axhline(value, color="0.4", linestyle="--", linewidth=0.9, label="base LM")
            positive = [x for x in all_x if x > 0]
            logx = spec.logx
            if logx is None:
                logx = bool(positive) and len(positive) == len(all_x) and max(positive) / min(positive) > 10
            if logx:
                ax.set_xscale("log")
            ax.set_xlabel(spec.xlabel)
            ax.set_ylabel(spec.ylabel)
            ax.grid(True, alpha=0.3, linewidth=0.5)
            ax.legend(frameon=False)
            fig.tight_layout()
            fig.savefig(path, dpi=DPI)
        finally:
            plt.close(fig)


def figure_renderer(spec: FigureSpec) -> Callable[[Sequence[ResultLine], RenderContext], Rendered]:
    """Register ``spec`` as a renderer under its name."""

    def render(lines: Sequence[ResultLine], ctx: RenderContext) -> Rendered:
        return render_figure(spec, lines, ctx)

    return register(spec.name, spec.title, "figure")(render)
