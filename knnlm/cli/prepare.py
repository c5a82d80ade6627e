"""``knnlm prepare``: raw corpora to fairseq-binarized folders with a ``meta.json``.

    knnlm prepare wikitext-2 [--from DIR|ZIP] [--no-verify]
    knnlm prepare wikitext-103 [--from DIR|ZIP] [--no-verify]
    knnlm prepare text --train F --valid F --test F --name NAME
    knnlm prepare demo

each with [--bpe sentencepiece [--vocab-size N] [--seed S]] [--dest data-bin] [--workers N] [--force].
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from knnlm.data import Tokenization, prepare_corpus, prepare_demo, prepare_wikitext, read_data_meta
from knnlm.data.prepare import DEFAULT_DEST, DEFAULT_SEED, DEFAULT_VOCAB_SIZES
from knnlm.data.sources import WIKITEXT, RawSplit

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``prepare`` and its per-corpus sub-commands."""
    parser = subparsers.add_parser(
        "prepare",
        help="download/verify, tokenize and binarize a corpus",
        description="Take a corpus (downloaded, offline copy, or plain files), check it, tokenize it "
        "and binarize it with fairseq into <dest>/<name>/, with a meta.json written last.",
    )
    corpora = parser.add_subparsers(dest="corpus", required=True, metavar="CORPUS")
    common = _common_options()
    for name in WIKITEXT:
        wikitext = corpora.add_parser(
            name,
            parents=[common],
            help=f"{name} (downloaded from {WIKITEXT[name].url} unless --from is given)",
        )
        wikitext.add_argument(
            "--from",
            dest="source",
            type=Path,
            metavar="DIR|ZIP",
            help=f"offline copy: a folder of wiki.*.tokens, or {WIKITEXT[name].archive_name}",
        )
        wikitext.add_argument(
            "--no-verify",
            action="store_true",
            help="accept files that differ from the published checksums (modified copies)",
        )
        wikitext.set_defaults(func=_run_wikitext)
    text = corpora.add_parser("text", parents=[common], help="any corpus of plain UTF-8 text files")
    for split in ("train", "valid", "test"):
        text.add_argument(f"--{split}", type=Path, required=True, metavar="FILE", help=f"{split} text")
    text.add_argument("--name", required=True, help="folder name under --dest")
    text.set_defaults(func=_run_text)
    demo = corpora.add_parser("demo", parents=[common], help="the bundled demo corpus (a WikiText-2 slice)")
    demo.set_defaults(func=_run_demo)


def _common_options() -> argparse.ArgumentParser:
    defaults = ", ".join(f"{name} {size}" for name, size in DEFAULT_VOCAB_SIZES.items())
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--bpe",
        choices=["sentencepiece"],
        default=None,
        help="tokenize with SentencePiece BPE trained on train (default: the corpus' own words); "
        "the folder is then named <name>-bpe<N>",
    )
    common.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        metavar="N",
        help=f"BPE vocabulary size (defaults: {defaults}; required for text)",
    )
    common.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"SentencePiece seed (default {DEFAULT_SEED})"
    )
    common.add_argument(
        "--dest",
        type=Path,
        default=DEFAULT_DEST,
        help=f"parent folder of the result (default: {DEFAULT_DEST})",
    )
    common.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="processes for binarization and threads for SentencePiece (default 1)",
    )
    common.add_argument(
        "--force",
        action="store_true",
        help="rebuild an existing folder; the old one is replaced only once the new one is complete",
    )
    return common


def _tokenization(args: argparse.Namespace) -> Tokenization:
    return Tokenization(kind=args.bpe or "word", vocab_size=args.vocab_size, seed=args.seed)


def _run_wikitext(args: argparse.Namespace) -> None:
    _report(
        prepare_wikitext(
            args.corpus,
            args.source,
            args.dest,
            tokenization=_tokenization(args),
            workers=args.workers,
            force=args.force,
            verify=not args.no_verify,
        )
    )


def _run_text(args: argparse.Namespace) -> None:
    splits = {
        split: RawSplit(getattr(args, split), option=f"--{split}") for split in ("train", "valid", "test")
    }
    _report(
        prepare_corpus(
            args.name,
            splits,
            args.dest,
            tokenization=_tokenization(args),
            workers=args.workers,
            force=args.force,
        )
    )


def _run_demo(args: argparse.Namespace) -> None:
    _report(prepare_demo(args.dest, tokenization=_tokenization(args), workers=args.workers, force=args.force))


def _report(folder: Path) -> None:
    meta = read_data_meta(folder)
    logger.info("prepared %s (dictionary: %s symbols)", folder, f"{meta.dictionary.size:,}")
    for split, stats in meta.splits.items():
        logger.info(
            "  %-5s %9s lines %12s tokens %10s <unk>",
            split,
            f"{stats.lines:,}",
            f"{stats.tokens:,}",
            f"{stats.unk:,}",
        )
