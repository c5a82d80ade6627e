"""Render the registered tables and figures of a set of result lines into one folder."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from knnlm.errors import KnnlmError
from knnlm.report.lines import ResultLine
from knnlm.report.registry import RENDERERS, RenderContext, Rendered


def render_report(
    lines: Sequence[ResultLine],
    out_dir: str | Path,
    *,
    names: Sequence[str] | None = None,
    where: Mapping[str, Any] | None = None,
    strict: bool = False,
) -> list[Rendered]:
    """Write ``<name>.md``/``<name>.png`` per renderer and ``report.md`` with all of them.

    With ``strict``, missing or ambiguous settings are an error (after writing), so
    a pipeline cannot publish a table with holes by accident.
    """
    if not lines:
        raise KnnlmError("no result lines to report; run `knnlm score` first")
    chosen = list(RENDERERS) if names is None else list(names)
    unknown = [n for n in chosen if n not in RENDERERS]
    if unknown:
        raise KnnlmError(f"unknown report part(s) {', '.join(unknown)}; choose from {', '.join(RENDERERS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = RenderContext(out_dir=out, where=dict(where or {}))
    rendered = [RENDERERS[name].fn(lines, ctx) for name in chosen]
    sources = sorted({line.source.rsplit(":", 1)[0] for line in lines})
    parts = ["# knnlm report", "", f"{len(lines)} result lines from {', '.join(sources)}.", ""]
    for r in rendered:
        parts += [r.markdown, ""]
    (out / "report.md").write_text("\n".join(parts), encoding="utf-8")
    holes = [f"{r.name}: {m}" for r in rendered for m in r.missing]
    if strict and holes:
        raise KnnlmError(
            f"{len(holes)} missing or ambiguous settings (see {out / 'report.md'}): "
            + "; ".join(holes[:5])
            + (" ..." if len(holes) > 5 else "")
        )
    return rendered
