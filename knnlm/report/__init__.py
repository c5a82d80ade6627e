"""Tables (markdown) and figures (PNG) rendered from result JSON lines.

Renderers live in a registry keyed by name (:data:`RENDERERS`); each selects the
lines it needs by their knobs and reports missing or ambiguous settings instead of
filling them in. To add one (e.g. the regularized-training tables with mean ± std
over seeds), write a module with a :class:`TableSpec` (``aggregate_over=("labels.seed",
...)``) or :class:`FigureSpec` passed to :func:`table_renderer`/:func:`figure_renderer`
(or any function decorated with :func:`register`) and import it here.
"""

from knnlm.report import ton2022 as _ton2022  # noqa: F401  (registers the tables and figure of Ton et al. 2022)
from knnlm.report import xu2023  # noqa: F401  (registers the built-in tables and figures)
from knnlm.report import xu2023_replacements as _xu2023_replacements  # noqa: F401  (Section 4, App. C, E)
from knnlm.report.figures import FigureSpec, Series, figure_renderer, render_figure
from knnlm.report.lines import ResultLine, best_line, best_setting, load_results, parse_line, pick, select
from knnlm.report.registry import RENDERERS, RenderContext, Rendered, Renderer, register
from knnlm.report.render import render_report
from knnlm.report.tables import Column, Row, TableSpec, render_table, table_renderer

__all__ = [
    "RENDERERS",
    "Column",
    "FigureSpec",
    "RenderContext",
    "Rendered",
    "Renderer",
    "ResultLine",
    "Row",
    "Series",
    "TableSpec",
    "best_line",
    "best_setting",
    "figure_renderer",
    "load_results",
    "parse_line",
    "pick",
    "register",
    "render_figure",
    "render_report",
    "render_table",
    "select",
    "table_renderer",
]
