"""Render what ``knnlm inspect`` gathered (:class:`~knnlm.evaluation.inspection.TokenView`).

Two renderings of the same views: a plain-text table for the terminal (at most
:data:`WIDTH` columns; ANSI colours only when asked, i.e. on a tty) and one
self-contained HTML page (inline CSS, no script, no external resource) where each
neighbour's context ends in its highlighted value and the kNN mass per value is
drawn as bars. Every word is escaped: a corpus may hold ``<script>``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from knnlm.evaluation.inspection import TokenView

WIDTH = 120
BAR = 30  # characters of the widest mass bar in the terminal
ELLIPSIS = "…"

_GREEN, _BOLD, _RESET = "\033[32m", "\033[1m", "\033[0m"


def _fit(text: str, width: int, keep_end: bool = False) -> str:
    """``text`` cut to ``width`` characters with an ellipsis (at the start when ``keep_end``)."""
    if len(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    return ELLIPSIS + text[-(width - 1) :] if keep_end else text[: width - 1] + ELLIPSIS


def _prob(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-4 or p == 0 else f"{p:.2e}"


def _context_text(words: list[str] | None) -> str:
    return "(context not available)" if words is None else " ".join(words)


def render_text(views: Sequence[TokenView], top_values: int = 8, color: bool = False) -> str:
    """The terminal report of ``views``, one block each."""
    return "\n\n".join(_text_block(v, top_values, color) for v in views) + "\n"


def _text_block(v: TokenView, top_values: int, color: bool) -> str:
    def hit(text: str) -> str:
        return f"{_GREEN}{_BOLD}{text}{_RESET}" if color else text

    p = v.probabilities
    target = f"[{v.target_text}]"
    lines = [
        _fit(
            f"cache {v.cache} (split {v.split}), token {v.position} of {v.n_tokens:,}, retrieval {v.retrieval}", WIDTH
        ),
        f"k={v.k} ({v.kept} kept)  τ={v.temperature:g}  λ={v.lam:g} ({v.lam_source})",
    ]
    context = _context_text(v.context)
    lines.append("context  " + _fit(context, WIDTH - 10 - len(target), keep_end=True) + " " + hit(target))
    lines.append(f"target   {v.target_text} (id {v.target})")
    lines.append(
        f"p_LM {_prob(p['lm'])}   p_kNN {_prob(p['knn'])}   p {_prob(p['interp'])}   (p = (1-λ)·p_LM + λ·p_kNN)"
    )
    lines.append("")
    value_w = 14
    header = f"{'rank':>4}  {'score':>12}  {'weight':>6}  {'value':<{value_w}}  =  context (words before the entry)"
    ctx_w = WIDTH - len(header) + len("context (words before the entry)")
    lines.append(f"top {len(v.neighbours)} of {v.kept} kept neighbours")
    lines.append(header)
    for n in v.neighbours:
        value = f"{_fit(n.value_text, value_w):<{value_w}}"
        lines.append(
            f"{n.rank:>4}  {n.score:>12.4f}  {n.weight:>6.4f}  {hit(value) if n.is_target else value}  "
            f"{'=' if n.is_target else ' '}  {_fit(_context_text(n.context), ctx_w, keep_end=True)}"
        )
    lines.append("")
    shown = v.masses[:top_values]
    lines.append(f"kNN mass per value (top {len(shown)} of {len(v.masses)} values)")
    lines.append(f"{'value':<{value_w}}  {'mass':>6}  {'nbrs':>5}  =")
    for m in shown:
        value = f"{_fit(m.text, value_w):<{value_w}}"
        bar = "#" * round(m.mass * BAR)
        lines.append(
            f"{hit(value) if m.is_target else value}  {m.mass:>6.4f}  {m.neighbours:>5}  "
            f"{'=' if m.is_target else ' '}  {bar}".rstrip()
        )
    for note in v.notes:
        lines.append(_fit(f"note: {note}", WIDTH))
    return "\n".join(lines)


_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #1d2330; }
h1 { font-size: 1.25em; margin: 0 0 .3em; }
h2 { font-size: 1.05em; margin: 1.4em 0 .4em; }
section.token { border-top: 2px solid #d0d5de; padding-top: .6em; margin-bottom: 2em; }
.meta { color: #555e6e; margin: .1em 0; }
.context { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 13px; }
mark { padding: 0 .25em; border-radius: 3px; }
mark.target { background: #ffd45c; font-weight: 600; }
mark.hit { background: #9fe0a4; font-weight: 600; }
mark.miss { background: #dfe3ea; }
table { border-collapse: collapse; margin-top: .3em; }
th, td { padding: .15em .6em; text-align: left; vertical-align: top; }
th { border-bottom: 1px solid #b8bfcc; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.hit td { background: #eefaef; }
.bar { height: .9em; background: #4c78d8; border-radius: 2px; display: inline-block; vertical-align: middle; }
.bar.hit { background: #3aa655; }
.barcell { width: 320px; }
.notes { color: #9a3b00; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _bar(fraction: float, hit: bool, width_px: int = 300) -> str:
    px = max(0.0, min(1.0, fraction)) * width_px
    return f'<span class="bar{" hit" if hit else ""}" style="width:{px:.1f}px"></span>'


def _context_html(words: list[str] | None, last: str, mark_class: str) -> str:
    before = "<em>(context not available)</em> " if words is None else _e(" ".join(words)) + " "
    return f'{before}<mark class="{mark_class}">{_e(last)}</mark>'


def render_html(views: Sequence[TokenView], top_values: int = 8, title: str = "knnlm inspect") -> str:
    """One self-contained HTML page showing every view in ``views``."""
    body = "\n".join(_html_section(v, top_values) for v in views)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _html_section(v: TokenView, top_values: int) -> str:
    p = v.probabilities
    out = [
        '<section class="token">',
        f'<h1>Token {v.position:,} of {v.n_tokens:,}: <mark class="target">{_e(v.target_text)}</mark></h1>',
        f'<p class="meta">cache {_e(v.cache)} (split {_e(v.split)}), retrieval {_e(v.retrieval)}; '
        f"k = {v.k} ({v.kept} kept), τ = {v.temperature:g}, λ = {v.lam:g} ({_e(v.lam_source)})</p>",
        f'<p class="context">{_context_html(v.context, v.target_text, "target")}</p>',
        "<table>",
    ]
    for label, key in (
        ("p<sub>LM</sub>", "lm"),
        ("p<sub>kNN</sub>", "knn"),
        ("p = (1−λ)·p<sub>LM</sub> + λ·p<sub>kNN</sub>", "interp"),
    ):
        out.append(
            f'<tr><td>{label}</td><td class="num">{_prob(p[key])}</td><td>{_bar(p[key], key == "knn")}</td></tr>'
        )
    out += [
        "</table>",
        f"<h2>Top {len(v.neighbours)} of {v.kept} kept neighbours</h2>",
        "<table>",
        "<tr><th>rank</th><th>score</th><th>weight</th><th>value</th><th>= target</th><th>context → value</th></tr>",
    ]
    for n in v.neighbours:
        out.append(
            f'<tr class="{"hit" if n.is_target else "miss"}"><td class="num">{n.rank}</td>'
            f'<td class="num">{n.score:.4f}</td><td class="num">{n.weight:.4f}</td><td>{_e(n.value_text)}</td>'
            f"<td>{'yes' if n.is_target else ''}</td>"
            f'<td class="context">{_context_html(n.context, n.value_text, "hit" if n.is_target else "miss")}</td></tr>'
        )
    shown = v.masses[:top_values]
    out += [
        "</table>",
        f"<h2>kNN mass per value (top {len(shown)} of {len(v.masses)} values)</h2>",
        "<table>",
        "<tr><th>value</th><th>mass</th><th>neighbours</th><th></th></tr>",
    ]
    for m in shown:
        out.append(
            f'<tr class="{"hit" if m.is_target else "miss"}"><td>{_e(m.text)}</td><td class="num">{m.mass:.4f}</td>'
            f'<td class="num">{m.neighbours}</td><td class="barcell">{_bar(m.mass, m.is_target)}</td></tr>'
        )
    out.append("</table>")
    if v.notes:
        out.append('<ul class="notes">' + "".join(f"<li>{_e(note)}</li>" for note in v.notes) + "</ul>")
    out.append("</section>")
    return "\n".join(out)
