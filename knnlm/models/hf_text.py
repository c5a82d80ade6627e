"""Raw text splits as Hugging Face tokenizer ids, with the dataset word each token belongs to.

Every line (with its end-of-line) is tokenized on its own, without special tokens,
and the lines are concatenated: the usual way WikiText is fed to GPT-2-style
models. *Words* are those of fairseq's WikiText count: the whitespace-separated
words of each line plus one end-of-line per line, so that per-word perplexity,
``exp(total NLL of all tokens / words)``, is on the scale of the word-level
results of the papers. A token belongs to the word that holds its last visible
character (a token of spaces only belongs to the next word), which merges
sub-word pieces back into the dataset's words.
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from knnlm.errors import KnnlmError

# file names tried, in order, for a split under --data (WikiText raw, WikiText tokenized, plain)
SPLIT_FILES = ("wiki.{split}.raw", "wiki.{split}.tokens", "{split}.txt", "{split}.raw")
LINES_PER_BATCH = 1024
_WORD = re.compile(r"\S+")


def find_split_file(data: str | os.PathLike, split: str) -> Path:
    """The raw text file of ``split`` under the folder ``data``."""
    folder = Path(data)
    if not folder.is_dir():
        raise KnnlmError(f"--data {folder} is not a folder; with --hf-model it must hold the raw text splits")
    for pattern in SPLIT_FILES:
        path = folder / pattern.format(split=split)
        if path.is_file():
            return path
    names = ", ".join(p.format(split=split) for p in SPLIT_FILES)
    raise KnnlmError(
        f"no raw text of split {split!r} under {folder} (looked for {names}); with --hf-model, --data is a "
        f"folder of raw text files, e.g. the unzipped wikitext-103-raw-v1 archive"
    )


def read_lines(path: Path) -> list[str]:
    """The file's lines, each ending with its ``\\n`` (a last line without one gets it)."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line + "\n" for line in lines]


def _batches(lines: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(lines), LINES_PER_BATCH):
        yield lines[i : i + LINES_PER_BATCH]


def line_word_starts(line: str) -> list[int]:
    """Character offsets where the line's words start; the end-of-line is the last word."""
    body = line[:-1] if line.endswith("\n") else line
    return [m.start() for m in _WORD.finditer(body)] + [len(body)]


def token_words(line: str, offsets: list[tuple[int, int]]) -> list[int]:
    """Index (within the line) of the word each token of ``line`` belongs to."""
    starts = line_word_starts(line)
    out = []
    for a, b in offsets:
        key = b  # a token of spaces only belongs to the word after it
        for k in range(min(b, len(line)) - 1, a - 1, -1):
            if not line[k].isspace() or line[k] == "\n":
                key = k
                break
        out.append(max(0, bisect.bisect_right(starts, key) - 1))
    return out


def tokenize_lines(tokenizer: Any, lines: list[str], words: bool) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Token ids of ``lines`` in chunks (int32 unless the vocabulary needs more) and, if asked, word ids."""
    if words and not getattr(tokenizer, "is_fast", False):
        raise KnnlmError(
            f"{type(tokenizer).__name__} is a slow tokenizer: per-word perplexity needs the offsets of a fast "
            "one; install `tokenizers` (pip install -e .[hf]) or use a model that ships tokenizer.json"
        )
    dtype = np.int32 if len(tokenizer) < 2**31 else np.int64
    chunks: list[np.ndarray] = []
    word_chunks: list[np.ndarray] = []
    word_base = 0
    for batch in _batches(lines):
        enc = tokenizer(batch, add_special_tokens=False, return_offsets_mapping=words, return_attention_mask=False)
        ids = enc["input_ids"]
        flat = np.fromiter((t for line_ids in ids for t in line_ids), dtype=dtype)
        if words:
            per_token = []
            for line, offsets in zip(batch, enc["offset_mapping"], strict=True):
                per_token.extend(word_base + w for w in token_words(line, offsets))
                word_base += len(line_word_starts(line))
            word_chunks.append(np.asarray(per_token, dtype=np.int64))
        if len(flat):
            chunks.append(flat)
    word_ids = np.concatenate(word_chunks) if words and word_chunks else None
    return chunks, word_ids
