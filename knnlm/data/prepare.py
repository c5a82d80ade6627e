"""Prepare a corpus for fairseq: check the raw text, tokenize it, binarize it, record ``meta.json``.

The result is ``<dest>/<name>/`` with fairseq's ``dict.txt`` and ``{train,valid,test}.{bin,idx}``,
the SentencePiece model when BPE is used, and ``meta.json``. The folder is built
in a temporary sibling and appears only when complete (see :func:`staging_dir`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import fairseq
import sentencepiece

import knnlm
from knnlm.data import sentencepiece_bpe
from knnlm.data.binarize import (
    DICT_FILE,
    PREPROCESS_OPTIONS,
    SplitStats,
    read_split_stats,
    run_fairseq_preprocess,
)
from knnlm.data.files import file_digest, staging_dir, text_stats
from knnlm.data.meta import DataMeta, DictionaryInfo, SourceInfo, TokenizationInfo, write_data_meta
from knnlm.data.sources import SPLITS, WIKITEXT, RawSplit, demo_splits, raw_file_name, wikitext_splits
from knnlm.errors import KnnlmError

logger = logging.getLogger(__name__)

DEFAULT_DEST = Path("data-bin")
DEFAULT_SEED = 1
# BPE vocabulary sizes used when --vocab-size is not given: the usual 32k for the
# 100M-token WikiText-103, fewer for smaller corpora so that pieces stay sub-word
# (WikiText-2 has only 33k word types).
DEFAULT_VOCAB_SIZES = {"wikitext-103": 32_000, "wikitext-2": 16_000, "demo": 4_000}
SPM_MODEL_FILE = "spm.model"
# scratch folders inside the staging folder, removed before meta.json is written
RAW_WORKDIR = "_raw"
SPM_WORKDIR = "_spm"


@dataclass(frozen=True)
class Tokenization:
    """How raw text becomes tokens: the corpus' own words, or SentencePiece BPE trained on train."""

    kind: Literal["word", "sentencepiece"] = "word"
    vocab_size: int | None = None
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if self.kind not in ("word", "sentencepiece"):
            raise KnnlmError(f"--bpe {self.kind}: unknown; use --bpe sentencepiece, or omit it for words")
        if self.kind == "word" and self.vocab_size is not None:
            raise KnnlmError("--vocab-size applies to BPE only; add --bpe sentencepiece or drop --vocab-size")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise KnnlmError(f"--vocab-size {self.vocab_size}: must be a positive number of pieces")

    def folder_suffix(self) -> str:
        """``-bpe<N>`` for BPE, so that word-level and BPE versions of a corpus live side by side."""
        return "" if self.kind == "word" else f"-bpe{self.vocab_size}"


def with_default_vocab_size(tokenization: Tokenization, dataset: str) -> Tokenization:
    """Fill in the dataset's default BPE vocabulary size; corpora without one need it given."""
    if tokenization.kind == "word" or tokenization.vocab_size is not None:
        return tokenization
    if dataset not in DEFAULT_VOCAB_SIZES:
        raise KnnlmError(f"--vocab-size is required with --bpe sentencepiece for {dataset} corpora")
    return Tokenization(tokenization.kind, DEFAULT_VOCAB_SIZES[dataset], tokenization.seed)


def prepare_corpus(
    name: str,
    splits: Mapping[str, Path | RawSplit],
    dest: Path = DEFAULT_DEST,
    *,
    tokenization: Tokenization = Tokenization(),
    workers: int = 1,
    force: bool = False,
    dataset: str = "text",
) -> Path:
    """Prepare raw text files (``{'train': ..., 'valid': ..., 'test': ...}``) into ``dest/name``.

    ``train`` is required (the dictionary and BPE model come from it); ``valid`` and
    ``test`` are optional. Returns the prepared folder.
    """
    raw = {split: s if isinstance(s, RawSplit) else RawSplit(Path(s)) for split, s in splits.items()}
    _check_request(name, raw.keys(), workers)
    tokenization = with_default_vocab_size(tokenization, dataset)
    final = Path(dest) / name
    with staging_dir(final, force) as folder:
        _build(folder, name, dataset, raw, tokenization, workers)
    return final


def prepare_wikitext(
    name: str,
    source: Path | None = None,
    dest: Path = DEFAULT_DEST,
    *,
    tokenization: Tokenization = Tokenization(),
    workers: int = 1,
    force: bool = False,
    verify: bool = True,
    downloads: Path | None = None,
) -> Path:
    """Prepare WikiText-2 or -103 into ``dest/<name>[-bpe<N>]``.

    ``source`` is a folder of ``wiki.*.tokens`` or the release's ``.zip``; without it the
    archive is downloaded into ``downloads`` (default ``dest/.downloads``) and kept there.
    Known checksums are enforced unless ``verify`` is false.
    """
    if name not in WIKITEXT:
        raise KnnlmError(f"unknown WikiText release {name!r}; choose one of {', '.join(WIKITEXT)}")
    _check_request(name, SPLITS, workers)
    tokenization = with_default_vocab_size(tokenization, name)
    folder_name = name + tokenization.folder_suffix()
    final = Path(dest) / folder_name
    with staging_dir(final, force) as folder:
        raw = wikitext_splits(
            WIKITEXT[name],
            None if source is None else Path(source),
            folder / RAW_WORKDIR,
            Path(downloads) if downloads is not None else Path(dest) / ".downloads",
            verify,
        )
        _build(folder, folder_name, name, raw, tokenization, workers)
    return final


def prepare_demo(
    dest: Path = DEFAULT_DEST,
    *,
    tokenization: Tokenization = Tokenization(),
    workers: int = 1,
    force: bool = False,
) -> Path:
    """Prepare the bundled demo corpus (a slice of WikiText-2) into ``dest/demo[-bpe<N>]``."""
    _check_request("demo", SPLITS, workers)
    tokenization = with_default_vocab_size(tokenization, "demo")
    folder_name = "demo" + tokenization.folder_suffix()
    final = Path(dest) / folder_name
    with staging_dir(final, force) as folder:
        _build(folder, folder_name, "demo", demo_splits(folder / RAW_WORKDIR), tokenization, workers)
    return final


def _check_request(name: str, splits: object, workers: int) -> None:
    if not name or name in (".", "..") or name.startswith(".") or "/" in name or "\\" in name:
        raise KnnlmError(f"--name {name!r}: must be a plain folder name (no path separators, no leading dot)")
    unknown = set(splits) - set(SPLITS)
    if unknown or "train" not in set(splits):
        raise KnnlmError(f"splits {sorted(splits)}: need 'train' and optionally 'valid'/'test', nothing else")
    if workers < 1:
        raise KnnlmError(f"--workers {workers}: must be at least 1")


def _build(
    folder: Path,
    name: str,
    dataset: str,
    raw: Mapping[str, RawSplit],
    tokenization: Tokenization,
    workers: int,
) -> DataMeta:
    """Fill ``folder``: inspect sources, tokenize, binarize, cross-check counts, write ``meta.json`` last."""
    sources = {split: inspect_source(split, raw[split], dataset) for split in raw}
    if sources["train"].words == 0:
        raise KnnlmError(
            f"{raw['train'].path}: only blank lines, so no dictionary can be built; pass the real train text"
        )
    inputs, piece_tokens, tokenization_info = _tokenize(folder, raw, sources, tokenization, workers)
    run_fairseq_preprocess(inputs, folder, workers)
    dictionary, unk_index = _dictionary_info(folder)
    splits = {split: read_split_stats(folder, split, unk_index) for split in raw}
    _check_counts(splits, sources, piece_tokens)
    for workdir in (RAW_WORKDIR, SPM_WORKDIR):
        shutil.rmtree(folder / workdir, ignore_errors=True)
    meta = DataMeta(
        name=name,
        dataset=dataset,
        tokenization=tokenization_info,
        dictionary=dictionary,
        splits=splits,
        sources=sources,
        knnlm_version=knnlm.__version__,
        fairseq_version=fairseq.__version__,
        binarizer_options=["fairseq_cli.preprocess", *PREPROCESS_OPTIONS],
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    write_data_meta(folder, meta)
    _log_summary(meta)
    return meta


def _check_counts(
    splits: Mapping[str, SplitStats], sources: Mapping[str, SourceInfo], piece_tokens: Mapping[str, int]
) -> None:
    """fairseq's counts must equal the text's: lines, and words (or pieces) plus one end-of-line each."""
    for split, stats in splits.items():
        source = sources[split]
        expected = piece_tokens[split] if piece_tokens else source.lines + source.words
        if (stats.lines, stats.tokens) != (source.lines, expected):
            raise RuntimeError(
                f"fairseq binarized {stats.lines} lines / {stats.tokens} tokens of {split}, "
                f"but the text has {source.lines} lines / {expected} tokens"
            )


def inspect_source(split: str, raw: RawSplit, dataset: str) -> SourceInfo:
    """Check that a raw file exists, is non-empty UTF-8 text and matches its known checksum; count it."""
    path = raw.path
    if not path.is_file():
        raise KnnlmError(f"{path}: no such file; {_source_hint(split, raw)}")
    size = path.stat().st_size
    if size == 0:
        raise KnnlmError(f"{path}: the file is empty; {_source_hint(split, raw)}")
    sha256 = file_digest(path)
    check = _checksum_check(path, raw, sha256, dataset)
    stats = text_stats(path)
    return SourceInfo(
        file=raw.origin or str(path.resolve()),
        sha256=sha256,
        bytes=size,
        lines=stats.lines,
        words=stats.words,
        check=check,
    )


def _source_hint(split: str, raw: RawSplit) -> str:
    if raw.option == "--from":
        names = ", ".join(raw_file_name(s) for s in SPLITS)
        return f"--from must name the folder holding {names} (or the release's .zip)"
    if raw.option:
        return f"pass a non-empty {split} text file with {raw.option}"
    return f"pass a non-empty {split} text file"


def _checksum_check(path: Path, raw: RawSplit, sha256: str, dataset: str) -> str:
    """Describe how the file was checked; a mismatch with a published checksum is an error.

    Files extracted from an archive whose MD5 matched are trusted: the archive
    checksum is the published one, so a differing per-file record only warns.
    """
    if raw.expected_sha256 == sha256:
        return "sha256 matches the published one"
    if raw.expected_sha256 and not raw.vouched_by:
        raise KnnlmError(
            f"{path}: SHA-256 {sha256} is not the published {raw.expected_sha256} of {dataset} "
            f"{path.name}; the copy is modified or incomplete: get a fresh copy, or pass --no-verify"
        )
    if raw.vouched_by:
        if raw.expected_sha256:
            logger.warning(
                "%s: SHA-256 %s differs from the one on record (%s) but the file comes from the "
                "verified archive %s; using it",
                path.name,
                sha256,
                raw.expected_sha256,
                raw.vouched_by,
            )
        return f"extracted from {raw.vouched_by}"
    return "skipped (--no-verify)" if raw.verify_skipped else "no published checksum"


def _tokenize(
    folder: Path,
    raw: Mapping[str, RawSplit],
    sources: Mapping[str, SourceInfo],
    tokenization: Tokenization,
    workers: int,
) -> tuple[dict[str, Path], dict[str, int], TokenizationInfo]:
    """Return fairseq's input files, the piece counts (empty for words) and the tokenization record."""
    if tokenization.kind == "word":
        return {split: r.path for split, r in raw.items()}, {}, TokenizationInfo(kind="word")
    model = folder / SPM_MODEL_FILE
    logger.info("training SentencePiece BPE (%d pieces) on %s", tokenization.vocab_size, raw["train"].path)
    sentencepiece_bpe.train_sentencepiece(
        raw["train"].path, model, tokenization.vocab_size, tokenization.seed, threads=workers
    )
    (folder / SPM_WORKDIR).mkdir()
    inputs, tokens = {}, {}
    for split, r in raw.items():
        inputs[split] = folder / SPM_WORKDIR / f"{split}.spm"
        tokens[split] = sentencepiece_bpe.encode_file(
            model, r.path, inputs[split], threads=workers, total_lines=sources[split].lines
        )
    info = TokenizationInfo(
        kind="sentencepiece",
        vocab_size=tokenization.vocab_size,
        seed=tokenization.seed,
        model_file=SPM_MODEL_FILE,
        model_sha256=file_digest(model),
        trainer_options={
            **sentencepiece_bpe.trainer_options(tokenization.vocab_size),
            "sentencepiece_version": sentencepiece.__version__,
        },
    )
    return inputs, tokens, info


def _dictionary_info(folder: Path) -> tuple[DictionaryInfo, int]:
    """The record of fairseq's ``dict.txt`` and the index of its ``<unk>`` symbol."""
    from fairseq.data import Dictionary

    dictionary = Dictionary.load(str(folder / DICT_FILE))
    info = DictionaryInfo(
        file=DICT_FILE,
        size=len(dictionary),
        sha256=file_digest(folder / DICT_FILE),
        special_symbols=dictionary.nspecial,
    )
    return info, dictionary.unk()


def _log_summary(meta: DataMeta) -> None:
    counts = ", ".join(f"{split} {s.tokens:,} tokens ({s.unk:,} <unk>)" for split, s in meta.splits.items())
    logger.info("%s: dictionary of %s symbols; %s", meta.name, f"{meta.dictionary.size:,}", counts)
