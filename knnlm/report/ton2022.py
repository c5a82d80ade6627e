"""Tables 1–2 and Figure 1 of Ton et al. (2022), "Regularized Training of Nearest Neighbor Language Models".

Rows are the weights ω of the activation-L2 regularizer (``labels.omega``, one model
per ω and seed, trained with ``--criterion activation_l2``); every number is a mean ±
sample std over the seeds (``labels.seed``), with the seeds listed so that a mean over
one run is never mistaken for one over five. The paper reports validation perplexity
with att keys, L2 distance, FAISS neighbours and scores, k = 1024, τ = 1, the kNN-LM
at λ = 0.3 (its best fixed λ) and at λ tuned on validation; those are the defaults
here, and ``knnlm report --where KNOB=VALUE`` changes or adds constraints. WIKI-2
(Table 1) and WIKI-103 (Table 2) are told apart by ``labels.dataset``; each dataset
found gets its own table and figure. Settings without lines are listed, never filled in.
The ω rows are the Eq. 2 models (``labels.criterion`` activation_l2, or no criterion label);
models of another criterion (Eq. 1, ``moco_queue``) get rows of their own below them, in the
table only: the figure is the ω sweep of Eq. 2.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

from knnlm.report.figures import COLUMN_WIDTH_IN, DPI, FIGURE_HEIGHT_IN, STYLE, plt
from knnlm.report.lines import ResultLine, best_line, differing_knobs, pick, same_value, select
from knnlm.report.registry import RenderContext, Rendered, register
from knnlm.report.tables import AMBIGUOUS, MISSING, fmt_mean_std

#: the setting of the paper's tables and figure
BASE: dict[str, Any] = {
    "split": "valid",
    "key_type": "att",
    "similarity": "l2",
    "mask_source": "faiss",
    "score_source": "faiss",
    "k": 1024,
    "temperature": 1.0,
    "datastore_fraction": 1.0,
}
#: the paper's fixed interpolation weight (best on every dataset it reports)
FIXED_LAMBDA = 0.3
#: the ω rows of the paper's tables, always listed (with "missing" when absent)
PAPER_OMEGAS: tuple[float, ...] = (0, 0.1, 1, 10)
#: knobs that legitimately differ between the seeds of one ω (one model each, with its own index file)
PER_MODEL = ("labels.seed", "labels.train_ppl", "checkpoint", "index.path")
OMEGA = "labels.omega"
SEED = "labels.seed"
DATASET = "labels.dataset"
TRAIN_PPL = "labels.train_ppl"
CRITERION = "labels.criterion"
#: the criterion of the paper's ω sweep (Eq. 2); a line without labels.criterion is read as it
EQ2 = "activation_l2"
#: the paper's name for each other criterion's rows
CRITERION_NAMES = {"moco_queue": "Eq. 1"}


@dataclass(frozen=True)
class PaperDataset:
    """How the paper names a dataset, which of its tables holds it, and its numbers to compare with."""

    display: str
    table: str
    reference: str


PAPER = {
    "wikitext2": PaperDataset(
        "WIKI-2",
        "Table 1",
        "Paper (valid): kNN-LM 74.11 at ω=0 → 70.63 at ω=1, the LM alone about 76 at every ω; λ=0.3 best.",
    ),
    "wikitext103": PaperDataset(
        "WIKI-103",
        "Table 2",
        "Paper (valid): kNN-LM 16.09 at ω=0 → 15.89 at ω=1; λ=0.3 best.",
    ),
}


def paper_dataset(name: Any) -> PaperDataset | None:
    """The paper's dataset for a ``labels.dataset`` value (``wikitext-2``, ``wikitext-103-bpe32000``, ``wiki2``)."""
    match = re.match(r"wiki(?:text)?[-_]?(2|103)(?!\d)", str(name).lower()) if name is not None else None
    return PAPER[f"wikitext{match.group(1)}"] if match else None


def fmt_omega(omega: float) -> str:
    return f"{omega:g}"


def _seed_order(seed: Any) -> tuple[int, float, str]:
    return (0, float(seed), "") if isinstance(seed, int | float) else (1, 0.0, str(seed))


@dataclass(frozen=True)
class SeedCell:
    """The lines of one (dataset, ω, λ) setting, one per seed; the last line read wins for a re-run seed."""

    status: str  # "ok" | "missing" | "ambiguous"
    by_seed: Mapping[Any, ResultLine]
    where: Mapping[str, Any]
    differing: tuple[str, ...] = ()

    def values(self, metric: str) -> list[float]:
        """The metric over the seeds (None for a line that lacks it)."""
        return [self.by_seed[s].metric(metric) for s in sorted(self.by_seed, key=_seed_order)]


def seed_cell(lines: Sequence[ResultLine], where: Mapping[str, Any]) -> SeedCell:
    """Select one setting's lines; lines that differ in anything but the per-model knobs make it ambiguous."""
    p = pick(lines, where, aggregate_over=PER_MODEL)
    if not p.ok:
        return SeedCell(p.status, {}, where, p.differing)
    chosen = {id(line) for line in p.lines}
    by_seed: dict[Any, ResultLine] = {}
    for line in lines:  # file order: a retrained seed read later replaces the earlier one
        if id(line) in chosen:
            by_seed[line.knobs.get(SEED)] = line
    return SeedCell("ok", by_seed, where)


#: the metric τ is tuned by: valid perplexity at λ tuned on valid at each τ (on every `knnlm score` line)
TAU_METRIC = "valid_interp_ppl"


@dataclass(frozen=True)
class TauSweepCell(SeedCell):
    """Per seed, the best line of its τ sweep, and the sweep's smallest and largest τ."""

    grid: Mapping[Any, tuple[float, float]] = dataclass_field(default_factory=dict)

    def at_edge(self) -> list[Any]:
        """Seeds whose best τ is the sweep's smallest or largest: the optimum may lie beyond it."""
        return [s for s, line in self.by_seed.items() if line.knobs.get("temperature") in self.grid[s]]


def tuned_tau_cell(lines: Sequence[ResultLine], where: Mapping[str, Any]) -> TauSweepCell:
    """Per seed, the line of a τ sweep (``where`` fixes all but τ) with the lowest valid perplexity.

    The sweep is read from the test-split lines ``knnlm score --temperature A,B,...`` writes: each
    carries the valid perplexity at λ tuned on valid, so τ is tuned on valid and never on test.
    """
    matched = select(lines, where)
    if not matched:
        return TauSweepCell("missing", {}, where)
    differing = differing_knobs(matched, (*PER_MODEL, "temperature"))
    if differing:
        return TauSweepCell("ambiguous", {}, where, tuple(differing))
    model_of_seed = {line.knobs.get(SEED): line.knobs.get("checkpoint") for line in matched}  # the last read wins
    by_seed: dict[Any, ResultLine] = {}
    grid: dict[Any, tuple[float, float]] = {}
    for seed in sorted(model_of_seed, key=_seed_order):
        model = {SEED: seed, "checkpoint": model_of_seed[seed]}
        best = best_line(matched, model, TAU_METRIC)
        if best is not None:
            by_seed[seed] = best
            taus = [line.knobs["temperature"] for line in select(matched, model)]
            grid[seed] = (min(taus), max(taus))
    return TauSweepCell("ok" if by_seed else "missing", by_seed, where, grid=grid)


@dataclass(frozen=True)
class OmegaRow:
    """One ω: the kNN-LM at tuned λ and at λ = 0.3 (τ = 1), and at τ tuned too; the LM and train ppl
    come from either of the first two."""

    omega: float
    tuned: SeedCell
    fixed: SeedCell
    tuned_tau: TauSweepCell
    criterion: str = EQ2

    @property
    def name(self) -> str:
        """How messages name the row: ``ω=1``, or ``Eq. 1 (moco_queue), ω=1`` for another criterion."""
        omega = f"ω={fmt_omega(self.omega)}"
        return omega if self.criterion == EQ2 else f"{self._criterion_text}, {omega}"

    @property
    def label(self) -> str:
        """The table's first cell: ω, and the criterion when it is not Eq. 2."""
        omega = fmt_omega(self.omega)
        return omega if self.criterion == EQ2 else f"{omega}, {self._criterion_text}"

    @property
    def _criterion_text(self) -> str:
        paper = CRITERION_NAMES.get(self.criterion)
        return f"{paper} ({self.criterion})" if paper else self.criterion

    @property
    def absent(self) -> bool:
        """Neither λ has a line: the ω was not run (or not scored) at all."""
        return self.tuned.status == self.fixed.status == "missing"

    def models(self) -> dict[Any, ResultLine]:
        """One line per seed that has any line (the LM ppl does not depend on λ)."""
        merged = {**self.fixed.by_seed, **self.tuned.by_seed}
        return {s: merged[s] for s in sorted(merged, key=_seed_order)}


@dataclass(frozen=True)
class DatasetBlock:
    """The rows of one dataset (``labels.dataset``; None when the lines do not say)."""

    dataset: Any
    rows: tuple[OmegaRow, ...]

    @property
    def paper(self) -> PaperDataset | None:
        return paper_dataset(self.dataset)

    @property
    def heading(self) -> str:
        if self.dataset is None:
            return "dataset not labelled (no labels.dataset)"
        paper = self.paper
        where = f"labels.dataset={self.dataset}"
        return f"{paper.display} (the paper's {paper.table}; {where})" if paper else where

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9.-]+", "_", str(self.dataset)) if self.dataset is not None else ""


def _omega_wanted(omega: float, wanted: Any) -> bool:
    if isinstance(wanted, tuple | list | set | frozenset):
        return any(same_value(omega, w) for w in wanted)
    return same_value(omega, wanted)


def _omegas(candidates: Sequence[ResultLine], where: Mapping[str, Any], listed: Sequence[float] = ()) -> list[float]:
    """The ω of the lines, plus ``listed`` (the paper's rows, shown even when missing), as ``where`` allows."""
    present = [line.knobs[OMEGA] for line in candidates if isinstance(line.knobs.get(OMEGA), int | float)]
    omegas: list[float] = []
    for omega in (*listed, *present):
        if not any(same_value(omega, seen) for seen in omegas):
            omegas.append(omega)
    if OMEGA in where:
        omegas = [w for w in omegas if _omega_wanted(w, where[OMEGA])]
    return sorted(omegas)


def collect(lines: Sequence[ResultLine], ctx: RenderContext) -> tuple[dict[str, Any], list[DatasetBlock]]:
    """The fixed knobs and, per dataset that has ω-labelled lines, the cells of every ω row."""
    fixed = {**BASE, **ctx.where}
    candidates = [line for line in select(lines, fixed) if line.knobs.get(OMEGA) is not None]
    # the τ sweep: the same knobs but τ, on the lines that report test (valid perplexity on each)
    sweep_fixed = {k: v for k, v in fixed.items() if k not in ("temperature", "split")}
    sweep_fixed.update({"split": "test", "lambda": "tune"})
    sweep = select(lines, sweep_fixed)
    datasets: list[Any] = []
    for line in candidates:
        name = line.knobs.get(DATASET)
        if name not in datasets:
            datasets.append(name)
    blocks = []
    for name in datasets:
        mine = [line for line in candidates if line.knobs.get(DATASET) == name]
        others = [c for c in dict.fromkeys(_criterion(line) for line in mine) if c != EQ2]
        criteria = ([EQ2] if ctx.where.get(CRITERION, EQ2) == EQ2 else []) + others
        rows = []
        for criterion in criteria:
            of_criterion = [line for line in mine if _criterion(line) == criterion]
            its_sweep = [line for line in sweep if _criterion(line) == criterion]
            for omega in _omegas(of_criterion, ctx.where, PAPER_OMEGAS if criterion == EQ2 else ()):
                where = {**fixed, DATASET: name, OMEGA: omega}
                rows.append(
                    OmegaRow(
                        omega,
                        seed_cell(of_criterion, {**where, "lambda": "tune"}),
                        seed_cell(of_criterion, {**where, "lambda": FIXED_LAMBDA}),
                        tuned_tau_cell(its_sweep, {**sweep_fixed, DATASET: name, OMEGA: omega}),
                        criterion,
                    )
                )
        blocks.append(DatasetBlock(name, tuple(rows)))
    return fixed, blocks


def _criterion(line: ResultLine) -> str:
    """The line's training criterion (labels.criterion); Eq. 2 when it does not say."""
    criterion = line.knobs.get(CRITERION)
    return EQ2 if criterion is None else str(criterion)


def _describe(where: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in where.items())


def _own_knobs(where: Mapping[str, Any], fixed: Mapping[str, Any]) -> str:
    """The knobs a cell adds to the table's fixed ones (those are printed once, above the table)."""
    return _describe({k: v for k, v in where.items() if k not in fixed or not same_value(fixed[k], v)})


def _cell_problem(label: str, cell: SeedCell, fixed: Mapping[str, Any]) -> str | None:
    if cell.status == "missing":
        return f"{label}: no line with {_own_knobs(cell.where, fixed)} (and the fixed knobs)"
    if cell.status == "ambiguous":
        return f"{label}: lines differ in {', '.join(cell.differing)}; fix them with --where KNOB=VALUE"
    return None


def _fmt(values: Sequence[float], n_seeds: int, digits: int = 2) -> str:
    """mean ± std (n=…); a single seed says n=1 when the row has more, so a lone run is not read as a mean."""
    text = fmt_mean_std(values, digits)
    return f"{text} (n=1)" if len(values) == 1 and n_seeds > 1 else text


def _metric_text(cell: SeedCell, metric: str, n_seeds: int, digits: int = 2) -> str:
    if cell.status == "missing":
        return MISSING
    if cell.status == "ambiguous":
        return AMBIGUOUS
    values = cell.values(metric)
    if any(v is None for v in values):
        return "–"
    return _fmt(values, n_seeds, digits)


def _seeds_text(seeds: Sequence[Any]) -> str:
    return f"{len(seeds)} ({', '.join(str(s) for s in seeds)})" if seeds else "0"


def _model_text(values: Sequence[Any], n_seeds: int) -> str:
    """A per-model value (train or LM ppl): "missing" without any line, "–" when lines lack it."""
    if not n_seeds:
        return MISSING
    if not values or any(v is None for v in values):
        return "–"
    return _fmt(values, n_seeds)


def _row(row: OmegaRow, fixed: Mapping[str, Any], missing: list[str]) -> list[str]:
    """The cells of one ω, and what it lacks (cells, seeds, train ppl) appended to ``missing``."""
    name = row.name
    models = row.models()
    seeds = list(models)
    if row.absent:  # said once for the row rather than once per column
        missing.append(f"{name}: no line with {_own_knobs(row.tuned.where, fixed)} or 0.3 (and the fixed knobs)")
    for label, cell in (("kNN-LM λ=0.3", row.fixed), ("kNN-LM tuned λ", row.tuned)):
        problem = _cell_problem(f"{name}, {label}", cell, fixed)
        if problem and not row.absent:
            missing.append(problem)
        elif not problem and len(cell.by_seed) < len(seeds):
            lacking = [str(s) for s in seeds if s not in cell.by_seed]
            missing.append(f"{name}, {label}: no line for seed(s) {', '.join(lacking)} (other columns have them)")
    train = [line.knobs.get(TRAIN_PPL) for line in models.values()]
    known = [v for v in train if isinstance(v, int | float)]
    if models and len(known) < len(train):
        absent = [str(s) for s, v in zip(seeds, train, strict=True) if not isinstance(v, int | float)]
        missing.append(f"{name}: no labels.train_ppl for seed(s) {', '.join(absent)}")
    lm = [line.metric("lm_ppl") for line in models.values()]
    tau = row.tuned_tau
    if not row.absent and tau.status == "ambiguous":
        missing.append(f"{name}, kNN-LM tuned τ: lines differ in {', '.join(tau.differing)}")
    elif not row.absent and len(tau.by_seed) < len(seeds):
        lacking = [str(s) for s in seeds if s not in tau.by_seed]
        missing.append(f"{name}, kNN-LM tuned τ: no τ sweep (test-split lines with {TAU_METRIC}) for seed(s) "
                       f"{', '.join(lacking)}")
    edge = tau.at_edge()
    if edge:
        ranges = "; ".join(f"seed {s}: {tau.grid[s][0]:g}–{tau.grid[s][1]:g}" for s in edge)
        missing.append(f"{name}, tuned τ: at the edge of the τ sweep ({ranges}); the optimum may lie beyond it")
    taus = ", ".join(
        f"{line.knobs.get('temperature'):g}" + (" (edge)" if s in edge else "") for s, line in tau.by_seed.items()
    ) or "–"
    return [
        row.label,
        _seeds_text(seeds),
        _model_text(known, len(seeds)),
        _model_text(lm, len(seeds)),
        _metric_text(row.fixed, "interp_ppl", len(seeds)),
        _metric_text(row.tuned, "interp_ppl", len(seeds)),
        _metric_text(row.tuned, "lambda_used", len(seeds)),
        _metric_text(tau, TAU_METRIC, len(seeds)) if tau.status != "missing" else "–",
        taus,
    ]


_HEADER = (
    "ω", "seeds", "train ppl", "LM valid ppl", "kNN-LM λ=0.3", "kNN-LM tuned λ", "tuned λ", "kNN-LM tuned τ, λ",
    "tuned τ",
)
TABLE_TITLE = "Tables 1–2 (Ton et al. 2022): perplexity vs the weight ω of the activation L2 regularizer"
FIGURE_TITLE = "Figure 1 (Ton et al. 2022): validation perplexity vs ω, LM and kNN-LM"


def _none_found(fixed: Mapping[str, Any]) -> str:
    return f"no result line with labels.omega matches {_describe(fixed)} (train with scripts/ton2022.sh)"


@register("ton2022_table", TABLE_TITLE, "table")
def render_table(lines: Sequence[ResultLine], ctx: RenderContext) -> Rendered:
    """Markdown, one table per dataset, also written to ``<out_dir>/ton2022_table.md``."""
    fixed, blocks = collect(lines, ctx)
    out = [f"### {TABLE_TITLE}", "", f"Fixed: {_describe(fixed)}."]
    out.append(
        "Cells: mean ± sample std over labels.seed (seeds: how many, and which). train ppl: labels.train_ppl, "
        "fairseq's training perplexity of the last epoch (dropout on, averaged over the epoch). LM valid ppl: "
        "the model alone. kNN-LM: interpolated with λ=0.3, and with λ tuned on the same valid split it is "
        "reported on (the paper reports validation perplexity), both at τ=1. kNN-LM tuned τ, λ: valid "
        "perplexity at the τ of the model's τ sweep (test-split lines, λ tuned on valid at each τ) that is "
        "best on valid; tuned τ: that τ, per seed. Rows: the activation-L2 models (Eq. 2; a line without "
        "labels.criterion is one) by ω, then the models of any other criterion (Eq. 1: moco_queue)."
    )
    missing: list[str] = []
    if not blocks:
        missing.append(_none_found(fixed))
        out += ["", f"Not rendered: {missing[0]}."]
    for block in blocks:
        out += ["", f"#### {block.heading}", ""]
        paper = block.paper
        out.append(paper.reference if paper else " ".join(d.reference for d in PAPER.values()))
        out += ["", "| " + " | ".join(_HEADER) + " |", "|---|---|" + "---:|" * (len(_HEADER) - 2)]
        block_missing: list[str] = []
        for row in block.rows:
            out.append("| " + " | ".join(_row(row, fixed, block_missing)) + " |")
        if block_missing:
            out += ["", "Missing or ambiguous (not filled in):", *(f"- {m}" for m in block_missing)]
        prefix = f"{paper.display if paper else block.heading}: " if len(blocks) > 1 else ""
        missing += [prefix + m for m in block_missing]
    markdown = "\n".join(out) + "\n"
    path = ctx.out_dir / "ton2022_table.md"
    path.write_text(markdown, encoding="utf-8")
    return Rendered("ton2022_table", TABLE_TITLE, markdown, [path], missing)


@dataclass(frozen=True)
class Curve:
    """One plotted series: which cell of the row it reads and which metric."""

    label: str
    cell: str  # "tuned" | "fixed" | "tuned_tau" | "models"
    metric: str


#: the paper's three series, plus the kNN-LM at each model's own tuned τ: where ω changes the keys'
#: scale, τ = 1 means a different temperature for every ω, and only this curve compares retrieval alone
CURVES = (
    Curve("LM", "models", "lm_ppl"),
    Curve("kNN-LM, tuned λ", "tuned", "interp_ppl"),
    Curve("kNN-LM, λ=0.3", "fixed", "interp_ppl"),
    Curve("kNN-LM, tuned τ and λ", "tuned_tau", TAU_METRIC),
)


def _curve_values(row: OmegaRow, curve: Curve) -> tuple[str, list[Any]]:
    """The cell's status and, when ok, the metric over its seeds."""
    if curve.cell == "models":
        models = row.models()
        return ("ok", [line.metric(curve.metric) for line in models.values()]) if models else (MISSING, [])
    cell = {"tuned": row.tuned, "fixed": row.fixed, "tuned_tau": row.tuned_tau}[curve.cell]
    return cell.status, cell.values(curve.metric) if cell.status == "ok" else []


def curve_points(rows: Sequence[OmegaRow], curve: Curve, missing: list[str]) -> list[tuple[float, float, float]]:
    """(ω, mean, std) per ω with finite values; std is 0 for a single seed."""
    points = []
    for row in rows:
        status, values = _curve_values(row, curve)
        name = f"{curve.label}, {row.name}"
        if status != "ok":
            missing.append(f"{name}: {status} (see ton2022_table)")
            continue
        if not values or any(not isinstance(v, int | float) or not math.isfinite(v) for v in values):
            missing.append(f"{name}: {curve.metric} is {values} (not plotted)")
            continue
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        points.append((float(row.omega), statistics.fmean(values), std))
    return points


#: the shared figure style with every text at 8 pt or more (readable at paper column width)
FIGURE_STYLE = {**STYLE, "legend.fontsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8}


def _plot(block: DatasetBlock, drawn: Sequence[tuple[Curve, list[tuple[float, float, float]]]], path: Path) -> None:
    """ppl vs ω on a symlog axis (linear near 0 so that ω=0 is shown), mean ± std bands."""
    with plt.rc_context(FIGURE_STYLE):
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH_IN, FIGURE_HEIGHT_IN))
        try:
            markers = "os^D"
            omegas: list[float] = []
            for i, (curve, points) in enumerate(drawn):
                xs, means, stds = zip(*points, strict=True)
                omegas += xs
                (line,) = ax.plot(xs, means, marker=markers[i % len(markers)], label=curve.label)
                lower = [m - s for m, s in zip(means, stds, strict=True)]
                upper = [m + s for m, s in zip(means, stds, strict=True)]
                ax.fill_between(xs, lower, upper, color=line.get_color(), alpha=0.2, linewidth=0)
            positive = [w for w in omegas if w > 0]
            ax.set_xscale("symlog", linthresh=min(positive) if positive else 1.0)
            ticks = sorted(set(omegas))
            ax.set_xticks(ticks)
            ax.set_xticklabels([fmt_omega(w) for w in ticks])
            ax.minorticks_off()
            ax.set_xlabel("ω (weight of the activation L2 penalty)")
            ax.set_ylabel("Validation perplexity")
            paper = block.paper
            if block.dataset is not None:
                ax.set_title(paper.display if paper else str(block.dataset))
            ax.grid(True, alpha=0.3, linewidth=0.5)
            ax.legend(frameon=False)
            fig.tight_layout()
            fig.savefig(path, dpi=DPI)
        finally:
            plt.close(fig)


@register("ton2022_figure1", FIGURE_TITLE, "figure")
def render_figure(lines: Sequence[ResultLine], ctx: RenderContext) -> Rendered:
    """One PNG per dataset: ``ton2022_figure1_<dataset>.png`` (``ton2022_figure1.png`` when unlabelled)."""
    fixed, blocks = collect(lines, ctx)
    md = [f"### {FIGURE_TITLE}", "", f"Fixed: {_describe(fixed)}."]
    md.append("Bands: mean ± sample std over labels.seed; the x axis is logarithmic above the smallest ω > 0.")
    missing: list[str] = []
    files: list[Path] = []
    if not blocks:
        missing.append(_none_found(fixed))
        md += ["", f"Not drawn: {missing[0]}."]
    for block in blocks:
        block_missing: list[str] = []
        sweep = [row for row in block.rows if row.criterion == EQ2]
        absent = [fmt_omega(row.omega) for row in sweep if row.absent]
        if absent:
            block_missing.append(f"ω={', '.join(absent)}: no lines (see ton2022_table)")
        rows = [row for row in sweep if not row.absent]
        drawn = [(curve, pts) for curve in CURVES if (pts := curve_points(rows, curve, block_missing))]
        md += ["", f"#### {block.heading}", ""]
        if drawn:
            path = ctx.out_dir / (f"ton2022_figure1_{block.slug}.png" if block.slug else "ton2022_figure1.png")
            _plot(block, drawn, path)
            files.append(path)
            md.append(f"![{FIGURE_TITLE}]({path.name})")
        else:
            md.append("Not drawn: no ω has a line.")
        elsewhere = [row.name for row in block.rows if row.criterion != EQ2]
        if elsewhere:
            md.append(f"Not on the ω axis of Eq. 2, in the table only: {', '.join(elsewhere)}.")
        if block_missing:
            md += ["", "Missing or ambiguous (not drawn):", *(f"- {m}" for m in block_missing)]
        prefix = f"{block.heading}: " if len(blocks) > 1 else ""
        missing += [prefix + m for m in block_missing]
    markdown = "\n".join(md) + "\n"
    return Rendered("ton2022_figure1", FIGURE_TITLE, markdown, files, missing)
