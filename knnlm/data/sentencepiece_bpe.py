"""SentencePiece BPE for language-model corpora: train on the train split, write pieces as text.

fairseq then binarizes the space-separated pieces like any word-level corpus, so
the dictionary, the binarized data and every later step are the same for both
tokenizations.

WikiText's own ``<unk>`` word is kept whole as a user-defined piece, so it
becomes fairseq's ``<unk>`` symbol after binarization (sentencepiece puts a
lone ``▁`` piece before it, for the preceding space). SentencePiece's own
unknown piece is renamed so that it cannot clash with it; characters that the
model has not seen come out as their surface text and fairseq maps them to
``<unk>``. bos/eos/pad are left to fairseq.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sentencepiece as spm
from tqdm import tqdm

from knnlm.errors import KnnlmError

logger = logging.getLogger(__name__)

LITERAL_UNK = "<unk>"
SPM_UNK_PIECE = "<spm-unk>"
ENCODE_BATCH_LINES = 10_000
# SentencePiece skips longer lines while training; WikiText paragraphs can be long.
MAX_SENTENCE_BYTES = 1 << 16


def trainer_options(vocab_size: int) -> dict[str, Any]:
    """The SentencePiece trainer options (recorded in ``meta.json`` as they are)."""
    return {
        "model_type": "bpe",
        "vocab_size": vocab_size,
        "character_coverage": 1.0,
        "max_sentence_length": MAX_SENTENCE_BYTES,
        "unk_id": 0,
        "unk_piece": SPM_UNK_PIECE,
        "bos_id": -1,
        "eos_id": -1,
        "pad_id": -1,
        "user_defined_symbols": [LITERAL_UNK],
    }


def _lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield line.rstrip("\n")


def train_sentencepiece(train: Path, model_file: Path, vocab_size: int, seed: int, threads: int) -> None:
    """Train a BPE model on ``train`` and write it to ``model_file``.

    Training reads the lines through Python, so no temporary paths end up in the
    model; with the seed fixed the learned pieces are the same on every run.
    """
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(train),
            model_writer=model,
            num_threads=threads,
            minloglevel=1,
            **trainer_options(vocab_size),
        )
    except RuntimeError as err:
        raise KnnlmError(_vocab_size_message(str(err), vocab_size, train)) from err
    model_file.write_bytes(model.getvalue())


def _vocab_size_message(spm_message: str, vocab_size: int, train: Path) -> str:
    """Turn SentencePiece's vocabulary-size errors into a message that names the option and the fix."""
    too_high = re.search(r"Vocabulary size too high.*<= (\d+)", spm_message)
    if too_high:
        return (
            f"--vocab-size {vocab_size} is too large for {train}: SentencePiece can learn at most "
            f"{too_high.group(1)} pieces from it; pass a smaller --vocab-size"
        )
    too_low = re.search(r"smaller than required_chars\. \d+ vs (\d+)", spm_message)
    if too_low:
        return (
            f"--vocab-size {vocab_size} is too small for {train}: it needs at least {too_low.group(1)} "
            f"pieces to cover every character; pass a larger --vocab-size"
        )
    return f"SentencePiece could not train on {train} with --vocab-size {vocab_size}: {spm_message}"


def encode_file(model_file: Path, src: Path, dst: Path, threads: int, total_lines: int | None = None) -> int:
    """Write ``src`` as space-separated pieces to ``dst``, one output line per input line.

    Returns the number of pieces plus one end-of-sentence per line, counted the way
    fairseq will count the written text.
    """
    processor = spm.SentencePieceProcessor(model_file=str(model_file))
    tokens = 0
    with (
        open(dst, "w", encoding="utf-8", newline="\n") as out,
        tqdm(total=total_lines, unit=" lines", desc=f"spm {src.name}", leave=False, disable=None) as bar,
    ):
        for batch in _batches(_lines(src), ENCODE_BATCH_LINES):
            for pieces in processor.encode(batch, out_type=str, num_threads=threads):
                text = " ".join(pieces)
                tokens += len(text.split()) + 1
                out.write(text + "\n")
            bar.update(len(batch))
    return tokens


def _batches(lines: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for line in lines:
        batch.append(line)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
