"""``knnlm report``: render result JSON lines into the papers' tables (markdown) and figures (PNG).

    knnlm report results.jsonl [more.jsonl ...] --out reports/wt103 \\
        [--only xu2023_table1,xu2023_figure5] [--where split=valid --where k=64] [--strict] [--list]
    knnlm report results.jsonl --where key_type=att --where lambda=tune --best temperature

Writes ``<out>/report.md`` plus ``<name>.md``/``<name>.png`` per table/figure.
``--best KNOB`` instead prints the knob's value on the matching line with the lowest
``--by`` metric (default ``valid_interp_ppl``: the setting tuned on valid).
Settings a table needs but the lines lack are shown as "missing" (never filled
in); ``--strict`` turns any of them into an error.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from knnlm.cli.options import key_values
from knnlm.errors import KnnlmError

logger = logging.getLogger(__name__)


def parse_where(items: list[str]) -> dict[str, Any]:
    """``KNOB=VALUE`` constraints; numbers and null are JSON, anything else text."""
    return key_values(items, "--where", "split=valid, labels.seed=1")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``report`` sub-command."""
    parser = subparsers.add_parser(
        "report",
        help="render result JSON lines into tables and figures",
        description="Render the JSON lines written by `knnlm score` into markdown tables and PNG figures "
        "(see --list). Each table fixes some knobs (e.g. k=1024, τ=1, λ tuned, test split); --where "
        "changes or adds such constraints.",
    )
    parser.add_argument("results", nargs="*", type=Path, metavar="JSONL", help="result files (in order)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="output folder")
    parser.add_argument("--only", metavar="NAMES", help="comma list of tables/figures (default: all)")
    parser.add_argument(
        "--where", action="append", default=[], metavar="KNOB=VALUE", help="constraint added to every part"
    )
    parser.add_argument("--strict", action="store_true", help="fail when a setting is missing or ambiguous")
    parser.add_argument("--list", action="store_true", help="list the available tables and figures")
    parser.add_argument(
        "--best",
        metavar="KNOB",
        help="print KNOB's value on the --where-matching line with the lowest --by metric, render nothing",
    )
    parser.add_argument(
        "--by", default="valid_interp_ppl", metavar="METRIC", help="metric --best minimizes (default: %(default)s)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from knnlm.report import RENDERERS, best_setting, load_results, render_report

    if args.list:
        for renderer in RENDERERS.values():
            print(f"{renderer.name:20s} {renderer.kind:6s} {renderer.title}")
        return
    if args.best:
        if not args.results:
            raise KnnlmError("give result files to choose --best from")
        where = parse_where(args.where)
        value = best_setting(load_results(args.results), where, args.best, args.by)
        if value is None:  # nothing printed: a script's $(...) is then empty
            logger.warning("no line matching %s has a finite %s", where or "anything", args.by)
        else:
            print(value)
        return
    if not args.results or args.out is None:
        raise KnnlmError("give result files and --out DIR (or --list)")
    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    lines = load_results(args.results)
    rendered = render_report(lines, args.out, names=names, where=parse_where(args.where), strict=args.strict)
    for r in rendered:
        files = ", ".join(str(f) for f in r.files) or "no file"
        flag = f" ({len(r.missing)} missing/ambiguous)" if r.missing else ""
        logger.info("%s: %s%s", r.name, files, flag)
    logger.info("report: %s", args.out / "report.md")
