"""``knnlm inspect``: what the kNN-LM retrieved for one token of a cache, and why it scored as it did.

    knnlm inspect --cache caches/test --valid-cache caches/valid --position 1234 [--html token.html]
    knnlm inspect --cache caches/valid --word Kingdom [--occurrence 2|all] [--k 64 --temperature 2 --lambda 0.25]
    knnlm inspect --prompt "the words to run" --checkpoint CKPT --data DATA_BIN --datastore ds/att \
        --index att.l2.faiss --lambda 0.25 [--position N|all]         # default: the prompt's last word

Prints the target with its LM, kNN and interpolated probabilities, the top neighbours
(rank, score, weight, value, the words before the entry in the datastore's split) and
the kNN mass per distinct value; ``--html`` writes the same as one self-contained page.
The knobs and their defaults are those of ``knnlm score`` (λ tuned on the validation cache).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
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


ALL = "all"


def _position(text: str) -> int | str:
    if text == ALL:
        return ALL
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token position or 'all'") from None


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
        "datastore's split, and the kNN mass per value. Knobs and defaults as in `knnlm score`. With --prompt, "
        "the words of a text are the tokens: the model runs on them and the datastore is searched first "
        "(key type, similarity and sources are then those of that search).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--cache", type=Path, metavar="DIR", help="cache of one split, retrieved")
    source.add_argument(
        "--prompt", metavar="TEXT", help="run --checkpoint on these words and retrieve from --datastore instead"
    )
    parser.add_argument(
        "--valid-cache", type=Path, metavar="DIR", help="cache λ is tuned on (default: --cache, if a valid split)"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--position", type=_position, metavar="N", help="token N (0-based); with --prompt also 'all' (default: last)"
    )
    where.add_argument("--word", metavar="W", help="a token whose target is the word W")
    parser.add_argument(
        "--occurrence", type=_occurrence, default=1, metavar="I", help="with --word: its I-th occurrence or 'all'"
    )
    parser.add_argument("--key-type", default="att", choices=KEY_TYPES, help="(default att)")
    parser.add_argument(
        "--similarity", choices=SIMILARITIES, help="(default l2; with --prompt: the index's, needed without one)"
    )
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
    prompt = parser.add_argument_group("with --prompt")
    prompt.add_argument("--checkpoint", metavar="PT", help="fairseq LM checkpoint (with --data, its data-bin)")
    prompt.add_argument("--index", metavar="FILE", help="FAISS index of --datastore (default: exact search)")
    prompt.add_argument("--real-score", action="store_true", help="rescore FAISS neighbours from the stored keys")
    prompt.add_argument("--nprobe", type=int, metavar="N", help="default: the index's stored nprobe")
    prompt.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    parser.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> None:
    if args.html is not None and args.html.is_dir():
        raise KnnlmError(f"--html {args.html} is a folder; give a file such as {args.html}/token.html")
    if args.prompt is not None:
        with tempfile.TemporaryDirectory(prefix="knnlm-prompt-") as tmp:
            _inspect_prompt(args, Path(tmp))
        return
    for option in ("checkpoint", "index", "nprobe", "real_score"):
        if getattr(args, option) not in (None, False):
            raise KnnlmError(f"--{option.replace('_', '-')} goes with --prompt; a cache was retrieved already")
    if args.position is None and args.word is None:
        raise KnnlmError("give --position N or --word W: which token of the cache to inspect")
    if args.position == ALL:
        raise KnnlmError("--position all goes with --prompt; give one position of the cache")
    cache = Cache(args.cache)
    setting = _setting(args, args.key_type, args.similarity or "l2", args.mask_source, args.score_source)
    _show(args, Inspector(cache, setting, **_inspector_options(args)), cache)


def _setting(args: argparse.Namespace, key_type: str, similarity: str, mask: str, score: str) -> ScoreSetting:
    return ScoreSetting(
        key_type=key_type,
        similarity=similarity,
        k=args.k,
        temperature=args.temperature,
        lam=args.lam,
        mask_source=mask,
        score_source=score,
    )


def _inspector_options(args: argparse.Namespace) -> dict[str, object]:
    valid = Cache(args.valid_cache) if args.valid_cache else None
    return {"valid_cache": valid, "data": args.data, "datastore": args.datastore, "context_words": args.context}


def _inspect_prompt(args: argparse.Namespace, tmp: Path) -> None:
    """Run the model on the prompt into a one-off cache under ``tmp``, then show it like any cache."""
    from knnlm.evaluation.dump import RetrievalConfig
    from knnlm.evaluation.prompt import prompt_cache

    missing = [f"--{o}" for o in ("checkpoint", "data", "datastore") if getattr(args, o) is None]
    if missing:
        raise KnnlmError(f"--prompt needs {', '.join(missing)}: the model, its data-bin and the datastore to search")
    retrieval = RetrievalConfig(
        cache=str(tmp),
        datastore=args.datastore,
        index=args.index,
        similarity=args.similarity,
        real_score=args.real_score,
        k_max=args.k,
        nprobe=args.nprobe,
        device=args.device,
    )
    words = prompt_cache(args.prompt, tmp, args.checkpoint, args.data, retrieval)
    cache = Cache(tmp)
    info = cache.retrieval(cache.retrieval_names[0]).info
    setting = _setting(args, *info.knobs)
    inspector = Inspector(cache, setting, query_words=words, **_inspector_options(args))
    _show(args, inspector, cache)


def _show(args: argparse.Namespace, inspector: Inspector, cache: Cache) -> None:
    if args.word is not None:
        positions = inspector.positions_of_word(args.word, args.occurrence)
    elif args.position is None:
        positions = [cache.n_tokens - 1]  # a prompt's last word
    elif args.position == ALL:
        positions = list(range(cache.n_tokens))
    else:
        positions = [args.position]
    views = [inspector.token(p, args.top) for p in positions]
    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    sys.stdout.write(render_text(views, args.top_values, color=color))
    if args.html is not None:
        title = f"knnlm inspect: {'prompt' if args.prompt else cache.path} token {positions[0]}"
        write_text_atomic(args.html, render_html(views, args.top_values, title=title))
        print(f"wrote {args.html}", file=sys.stderr)
