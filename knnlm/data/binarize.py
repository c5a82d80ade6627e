"""Binarize text with fairseq's own preprocessing, and read the counts back from its output.

``fairseq_cli.preprocess`` runs in-process with ``--only-source``: the dictionary
is built from the train split with no frequency threshold (every train type is
kept, as in both papers) and fairseq's default padding of its size to a multiple of 8.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# Everything but the paths; recorded in meta.json.
PREPROCESS_OPTIONS = (
    "--only-source",
    "--task",
    "language_modeling",
    "--dataset-impl",
    "mmap",
    "--thresholdsrc",
    "0",
    "--padding-factor",
    "8",
)
DICT_FILE = "dict.txt"
COUNT_CHUNK_TOKENS = 1 << 24


@dataclass(frozen=True)
class SplitStats:
    """Counts of one binarized split: sentences (= input lines), tokens incl. end-of-sentence, ``<unk>``s."""

    lines: int
    tokens: int
    unk: int


def run_fairseq_preprocess(inputs: Mapping[str, Path], destdir: Path, workers: int) -> None:
    """Build ``dict.txt`` from ``inputs['train']`` and write ``{split}.bin/.idx`` for every split."""
    from fairseq import options
    from fairseq_cli import preprocess

    argv = [*PREPROCESS_OPTIONS, "--destdir", str(destdir), "--workers", str(workers)]
    for split, path in inputs.items():
        argv += [f"--{split}pref", str(path)]
    args = options.get_preprocessing_parser().parse_args(argv)
    try:
        preprocess.main(args)
    finally:
        _close_log_file(preprocess.logger, destdir)


def _close_log_file(fairseq_logger: logging.Logger, destdir: Path) -> None:
    """Detach the ``preprocess.log`` handler fairseq adds on every call, and drop the file.

    Left attached it would keep the file open and log later runs into this folder.
    """
    for handler in list(fairseq_logger.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == destdir:
            fairseq_logger.removeHandler(handler)
            handler.close()
    (destdir / "preprocess.log").unlink(missing_ok=True)


def read_split_stats(destdir: Path, split: str, unk_index: int) -> SplitStats:
    """Lines, tokens and ``<unk>`` count of a binarized split, from fairseq's index and data files."""
    from fairseq.data import indexed_dataset

    prefix = str(destdir / split)
    index = indexed_dataset.MMapIndexedDataset.Index(indexed_dataset.index_file_path(prefix))
    sizes = np.asarray(index.sizes, dtype=np.int64)
    data = np.memmap(indexed_dataset.data_file_path(prefix), dtype=index.dtype, mode="r")
    unk = sum(
        int(np.count_nonzero(data[start : start + COUNT_CHUNK_TOKENS] == unk_index))
        for start in range(0, len(data), COUNT_CHUNK_TOKENS)
    )
    return SplitStats(lines=len(sizes), tokens=int(sizes.sum()), unk=unk)
