"""``knnlm``: one entry point, one sub-command module per job.

Each module in :data:`COMMANDS` exposes ``register(subparsers)``, which adds
its sub-command and sets ``func`` to a callable taking the parsed namespace.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from knnlm.errors import KnnlmError

COMMANDS = ["prepare", "datastore", "index", "eval", "score", "replace", "report", "analyze"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knnlm", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"knnlm.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        force=True,  # importing fairseq configures the root logger first
    )
    try:
        args.func(args)
    except KnnlmError as err:
        print(f"knnlm {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
