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

COMMANDS = ["prepare", "datastore", "index", "eval", "score", "replace", "report", "analyze", "inspect", "generate"]


VERBOSE_FLAGS = ("-v", "--verbose", "--debug")


def configure_logging(verbose: bool) -> None:
    """knnlm's own messages at INFO, libraries at WARNING; ``-v``: everything at DEBUG, timestamped.

    Runs before any sub-command module is imported: fairseq calls ``logging.basicConfig(level=DEBUG)``
    while it is imported, and a root logger that has a handler already makes that a no-op, so the
    loader chatter of faiss, fairseq and matplotlib never reaches the terminal.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s" if verbose else "%(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("knnlm").setLevel(logging.DEBUG if verbose else logging.INFO)
    # Python warnings of the libraries (torch's deprecation notices, ...) only with -v
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.DEBUG if verbose else logging.ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knnlm", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument(
        *VERBOSE_FLAGS, dest="verbose", action="store_true",
        help="debug logging of knnlm and its libraries, and full tracebacks",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"knnlm.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    configure_logging(any(flag in argv for flag in VERBOSE_FLAGS))
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except KnnlmError as err:
        if args.verbose:
            raise
        print(f"knnlm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.verbose:
            raise
        print(
            f"knnlm {args.command}: interrupted; what was committed is kept (progress.json), and the same "
            "command resumes from there",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
