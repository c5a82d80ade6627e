"""The training vocabulary: symbols and training counts from fairseq's ``dict.txt``, the training token stream.

fairseq numbers its dictionary as ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3 and
then the lines of ``dict.txt`` (``word count``, optionally flagged
``#fairseq:overwrite``) in file order; :func:`read_dictionary` reproduces that
numbering without importing fairseq, so token ids in a cache map to the right
words. The special symbols have no training count in ``dict.txt``; analyses that
bin or describe words by their training frequency leave them out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from knnlm.errors import KnnlmError

SPECIAL_SYMBOLS = ("<s>", "<pad>", "</s>", "<unk>")
EOS_INDEX = 2
UNK_INDEX = 3
_OVERWRITE = "#fairseq:overwrite"


@dataclass(frozen=True)
class Vocabulary:
    """Symbols in id order, their training counts (0 for special symbols) and where they came from."""

    symbols: tuple[str, ...]
    counts: np.ndarray  # int64 [V]
    path: Path
    nspecial: int = len(SPECIAL_SYMBOLS)

    def __len__(self) -> int:
        return len(self.symbols)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the symbols in id order (the datastore's ``dictionary_fingerprint`` convention)."""
        return hashlib.sha256("\n".join(self.symbols).encode("utf-8")).hexdigest()

    @property
    def is_word(self) -> np.ndarray:
        """Boolean [V]: ids that are ordinary words (not fairseq's special symbols)."""
        mask = np.ones(len(self.symbols), dtype=bool)
        mask[: self.nspecial] = False
        return mask

    def index(self) -> dict[str, int]:
        """Symbol -> id (the last id wins for an overwritten symbol, as in fairseq)."""
        return {s: i for i, s in enumerate(self.symbols)}


def resolve_dictionary(dictionary: str | Path | None, data_bin: str | Path | None) -> Path:
    """The dict.txt to read: ``dictionary`` itself, or ``<data_bin>/dict.txt``."""
    if dictionary:
        path = Path(dictionary)
        return path / "dict.txt" if path.is_dir() else path
    if data_bin:
        return Path(data_bin) / "dict.txt"
    raise KnnlmError("no dictionary given: pass --dict data-bin/NAME/dict.txt or --data-bin data-bin/NAME")


def read_dictionary(path: str | Path) -> Vocabulary:
    """Parse a fairseq ``dict.txt`` into the ids fairseq gives its symbols."""
    path = Path(path)
    if not path.is_file():
        raise KnnlmError(f"dictionary {path} does not exist; pass the data-bin's dict.txt with --dict")
    symbols = list(SPECIAL_SYMBOLS)
    counts = [0] * len(SPECIAL_SYMBOLS)
    seen = set(symbols)
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\n").rstrip()
            if not line:
                continue
            word, _, field = line.rpartition(" ")
            overwrite = field == _OVERWRITE
            if overwrite:
                word, _, field = word.rpartition(" ")
            if not word or not field.lstrip("-").isdigit():
                raise KnnlmError(f"{path}:{lineno}: expected 'WORD COUNT', got {line!r}; is this a fairseq dict.txt?")
            if word in seen and not overwrite:
                raise KnnlmError(f"{path}:{lineno}: duplicate word {word!r} without {_OVERWRITE}; fix the dictionary")
            seen.add(word)
            symbols.append(word)
            counts.append(int(field))
    return Vocabulary(tuple(symbols), np.asarray(counts, dtype=np.int64), path)


def check_cache_vocabulary(cache_path: Path, dict_size: int, cache_fingerprint: str | None, vocab: Vocabulary) -> None:
    """Refuse a cache whose token ids were made with another dictionary."""
    if dict_size != len(vocab):
        raise KnnlmError(
            f"{cache_path / 'meta.json'} has dict_size {dict_size} but {vocab.path} has {len(vocab)} symbols "
            f"(with fairseq's 4 special ones); pass the dict.txt of the data-bin the cache was dumped from"
        )
    if cache_fingerprint and cache_fingerprint.removeprefix("sha256:") != vocab.fingerprint:
        raise KnnlmError(
            f"{cache_path / 'meta.json'} names dictionary {cache_fingerprint} but {vocab.path} is "
            f"{vocab.fingerprint}; pass the dict.txt of the data-bin the cache was dumped from"
        )


def word_length(symbol: str) -> int:
    """Characters of a word, without subword markers (sentencepiece ``▁`` prefix, ``@@`` continuation)."""
    return len(symbol.removeprefix("\u2581").removesuffix("@@"))


def encode_text(lines: Iterable[str], vocab: Vocabulary) -> np.ndarray:
    """Whitespace tokens of each line then ``</s>``, as fairseq binarizes a language-modelling corpus.

    Words missing from the dictionary become ``<unk>``.
    """
    index = vocab.index()
    ids: list[int] = []
    for line in lines:
        ids.extend(index.get(word, UNK_INDEX) for word in line.split())
        ids.append(EOS_INDEX)
    return np.asarray(ids, dtype=np.int64)


def read_text_stream(path: str | Path, vocab: Vocabulary) -> np.ndarray:
    """The token ids of a text file (one sentence or paragraph per line), fairseq style."""
    path = Path(path)
    if not path.is_file():
        raise KnnlmError(f"text file {path} does not exist; pass the training text with --text")
    with open(path, encoding="utf-8") as f:
        return encode_text(f, vocab)


def read_binarized_stream(prefix: str | Path, vocab: Vocabulary) -> np.ndarray:
    """The whole token stream of a fairseq mmap-binarized split (``PREFIX.bin``/``.idx``), memory-mapped.

    fairseq stores the lines back to back (each ending in ``</s>``), so the ``.bin``
    file read with the index's dtype is the training stream in order.
    """
    from fairseq.data.indexed_dataset import MMapIndexedDataset

    prefix = Path(prefix)
    idx, bin_path = prefix.with_name(prefix.name + ".idx"), prefix.with_name(prefix.name + ".bin")
    if not idx.is_file() or not bin_path.is_file():
        raise KnnlmError(
            f"{idx} / {bin_path} not found: pass a data-bin made by `knnlm prepare` (--data-bin) "
            f"or a text file (--text)"
        )
    try:
        index = MMapIndexedDataset.Index(str(idx))
    except (AssertionError, OSError, KeyError, ValueError) as err:
        raise KnnlmError(f"{idx} is not a fairseq mmap index ({err}); re-binarize with --dataset-impl mmap") from err
    dtype = np.dtype(index.dtype)
    n_tokens = int(np.asarray(index.sizes, dtype=np.int64).sum())
    del index
    if bin_path.stat().st_size != n_tokens * dtype.itemsize:
        raise KnnlmError(f"{bin_path} does not hold the {n_tokens} tokens its index lists; re-binarize the data")
    stream = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,))
    if n_tokens and int(stream.max()) >= len(vocab):
        raise KnnlmError(f"{bin_path} has token ids beyond the {len(vocab)} symbols of {vocab.path}; wrong --dict")
    return stream
