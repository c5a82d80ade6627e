"""``knnlm inspect``: what the kNN-LM retrieved for one token of a cache, and why it scored as it did.

    knnlm inspect --cache caches/test --valid-cache caches/valid --position 1234 [--html token.html]
    knnlm inspect --cache caches/valid --word Kingdom [--occurrence 2|all] [--k 64 --temperature 2 --lambda 0.25]

Prints the target with its LM, kNN and interpolated probabilities, the top neighbours
(rank, score, weight, value, the words before the entry in the datastore's split) and
the kNN mass per distinct value; ``--html`` writes the same as one self-contained page.
The knobs and their defaults are those of ``knnlm score`` (λ tuned on the validation cache).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from knnlm.errors import KnnlmError
from knnlm.evaluation.cache import KEY_TYPES, SIMILARITIES, SOURCES, Cache
from knnlm.evaluation.inspection import DEFAULT_CONTEXT_WORDS, Inspector
from knnlm.evaluation.score import TUNE, ScoreSetting
from knnlm.io import write_text_atomic
from knnlm.report.inspection import render_html, render_text


def _lambda(text: str) -> float | str:
    if text == TUNE:
        return TUNE
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'tune' or a number in [0, 1]") from None


def _occurrence(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer or 'all'") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``inspect`` sub-command."""
    parser = subparsers.add_parser(
        "inspect",
        help="show what was retrieved for one token of a cache (terminal table, optional HTML page)",
        description="For one token of a cache (--position, or an occurrence of --word as the target): the LM, "
        "kNN and interpolated probability of the target, the top neighbours with their contexts in the "
        "datastore's split, and the kNN mass per value. Knobs and defaults as in `knnlm score`.",
    )
    parser.add_argument("--cache", required=True, type=Path, metavar="DIR", help="cache of one split, retrieved")
    parser.add_argument(
        "--valid-cache", type=Path, metavar="DIR", help="cache λ is tuned on (default: --cache unless a test split)"
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--position", type=int, metavar="N", help="token N of the cache (0-based)")
    where.add_argument("--word", metavar="W", help="a token whose target is the word W")
    parser.add_argument(
        "--occurrence", type=_occurrence, default=1, metavar="I", help="with --word: its I-th occurrence or 'all'"
    )
    parser.add_argument("--key-type", default="att", choices=KEY_TYPES, help="(default att)")
    parser.add_argument("--similarity", default="l2", choices=SIMILARITIES, help="(default l2)")
    parser.add_argument("--mask-source", default="faiss", choices=SOURCES, help="which neighbours (default faiss)")
    parser.add_argument("--score-source", default="faiss", choices=SOURCES, help="their scores (default faiss)")
    parser.add_argument("--k", type=int, default=1024, metavar="N", help="neighbours kept, <= k_max (default 1024)")
    parser.add_argument(
        "--temperature", type=float, default=1.0, metavar="X", help="softmax temperature τ > 0 (default 1)"
    )
    parser.add_argument(
        "--lambda", dest="lam", type=_lambda, default=TUNE, metavar="X", help="'tune' (default) or λ in [0, 1]"
    )
    parser.add_argument("--top", type=int, default=10, metavar="N", help="neighbours shown (default 10)")
    parser.add_argument("--top-values", type=int, default=8, metavar="N", help="values shown with their mass")
    parser.add_argument(
        "--context", type=int, default=DEFAULT_CONTEXT_WORDS, metavar="N", help="words of context shown (default 12)"
    )
    parser.add_argument(
        "--data", metavar="DIR", help="the data-bin, where it moved since the build (default: recorded)"
    )
    parser.add_argument("--datastore", metavar="DIR", help="the retrieval's datastore (default: recorded path)")
    parser.add_argument("--html", type=Path, metavar="OUT.html", help="also write a self-contained HTML page")
    parser.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> None:
    if args.html is not None and args.html.is_dir():
        raise KnnlmError(f"--html {args.html} is a folder; give a file such as {args.html}/token.html")
    setting = ScoreSetting(
        key_type=args.key_type,
        similarity=args.similarity,
        k=args.k,
        temperature=args.temperature,
        lam=args.lam,
        mask_source=args.mask_source,
        score_source=args.score_source,
    )
    cache = Cache(args.cache)
    valid = Cache(args.valid_cache) if args.valid_cache else None
    inspector = Inspector(
        cache, setting, valid_cache=valid, data=args.data, datastore=args.datastore, context_words=args.context
    )
    if args.word is not None:
        positions = inspector.positions_of_word(args.word, args.occurrence)
    else:
        positions = [args.position]
    views = [inspector.token(p, args.top) for p in positions]
    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    sys.stdout.write(render_text(views, args.top_values, color=color))
    if args.html is not None:
        title = f"knnlm inspect: {cache.path} token {positions[0]}"
        write_text_atomic(args.html, render_html(views, args.top_values, title=title))
        print(f"wrote {args.html}", file=sys.stderr)
