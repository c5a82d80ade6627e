"""Figure conventions of the analyses: paper-sized, ≥ 8 pt text, labelled axes, Agg backend.

Widths are a paper column (3.3 in) or the full text width (7 in); all text is at
least 8 pt so that the PNG stays readable when printed at that width. The Agg
backend renders without a display (servers, CI). :func:`save_figure` refuses a
figure with an unlabelled axis or smaller text rather than writing an unreadable plot.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402

COLUMN_WIDTH_IN = 3.3
TEXT_WIDTH_IN = 7.0
PANEL_HEIGHT_IN = 2.5
DPI = 300
MIN_FONT_PT = 8.0
STYLE = {
    "font.size": 8,
    "axes.labelsize": 8,
    "axes.titlesize": 8,
    "legend.fontsize": 8,
    "legend.title_fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "figure.titlesize": 9,
    "lines.linewidth": 1.2,
    "lines.markersize": 3.5,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
}

#: colours of the two compared conditions (model A / B, FAISS / real mask), colour-blind safe
PAIR_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7")


def figure_width(n_panels: int) -> float:
    """One column for a single panel, the text width for two or more."""
    return COLUMN_WIDTH_IN if n_panels <= 1 else TEXT_WIDTH_IN


@contextmanager
def paper_style() -> Iterator[None]:
    """Matplotlib settings for every analysis figure (fonts ≥ 8 pt)."""
    with plt.rc_context(STYLE):
        yield


def new_figure(n_panels: int, height: float = PANEL_HEIGHT_IN, sharey: bool = False) -> tuple[Figure, list]:
    """A figure with ``n_panels`` side by side, sized for a paper (call inside :func:`paper_style`)."""
    fig, axes = plt.subplots(
        1, n_panels, figsize=(figure_width(n_panels), height), sharey=sharey, squeeze=False, layout="constrained"
    )
    return fig, list(axes[0])


def check_figure(fig: Figure) -> None:
    """Raise if a data axis lacks an x or y label, or some text is below 8 pt: a figure must be readable."""
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            if not (ax.get_ylabel() or ax.get_xlabel()):
                raise ValueError("a colour bar has no label")
            continue
        if ax.axison and (not ax.get_xlabel() or not ax.get_ylabel()):
            raise ValueError(f"axis {ax.get_title()!r} lacks an x or y label")
    for text in fig.findobj(Text):
        if text.get_visible() and text.get_text() and text.get_fontsize() < MIN_FONT_PT:
            raise ValueError(f"text {text.get_text()!r} is {text.get_fontsize()} pt, below {MIN_FONT_PT} pt")


def save_figure(fig: Figure, path: Path) -> Path:
    """Check the labels, write the PNG (constrained layout, set by :func:`new_figure`) and close the figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        check_figure(fig)
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path
