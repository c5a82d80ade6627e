"""File helpers for data preparation: checksums, text statistics, atomic writes, staging folders.

Every artifact folder is built in a hidden temporary sibling and renamed into
place only once complete, so a folder at its final path is always whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knnlm.errors import KnnlmError
from knnlm.io import write_json_atomic

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
META_FILE = "meta.json"


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks so that large corpora never sit in memory."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class TextStats:
    """Counts of a text file in fairseq's conventions (universal newlines, whitespace words)."""

    lines: int
    words: int

    @property
    def tokens(self) -> int:
        """Words plus one end-of-sentence token per line: the number of tokens fairseq binarizes."""
        return self.words + self.lines


def text_stats(path: Path) -> TextStats:
    """Count lines and words the way fairseq's binarizer reads them, checking the file is UTF-8.

    fairseq opens text files in universal-newline mode and splits lines on any
    whitespace, which is what ``for line in f`` and ``str.split`` do too.
    """
    lines = words = 0
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                lines += 1
                words += len(line.split())
    except UnicodeDecodeError as err:
        raise KnnlmError(
            f"{path}: not UTF-8 text (byte {err.start} of line {lines + 1}); convert it to UTF-8"
        ) from err
    return TextStats(lines=lines, words=words)


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON atomically, keys in the order given: readers see no file or a complete one."""
    write_json_atomic(path, data, sort_keys=False)


def _unique_sibling(path: Path, kind: str) -> Path:
    """A hidden, unused name next to ``path``, e.g. ``.wikitext-2.partial-1a2b3c4d``.

    Unlike ``tempfile.mkdtemp`` the caller creates it, so it gets the usual
    permissions (umask) rather than owner-only ones.
    """
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:12]}")


def check_destination(final: Path, force: bool) -> None:
    """Refuse to overwrite an existing folder unless ``force``; fail before any expensive work."""
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise KnnlmError(f"{final} exists and is not a folder; remove it or choose another --dest")
    if not final.exists() or force or not any(final.iterdir()):
        return
    if (final / META_FILE).is_file():
        raise KnnlmError(f"{final} is already prepared; pass --force to rebuild and replace it")
    raise KnnlmError(
        f"{final} exists and was not written by knnlm (no {META_FILE}); "
        f"remove it, choose another --dest, or pass --force to replace it"
    )


@contextlib.contextmanager
def staging_dir(final: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` to build into; move it to ``final`` on success.

    On any error the temporary folder is removed and ``final`` is untouched. With
    ``force`` an existing ``final`` is replaced only after the new folder is complete.
    """
    check_destination(final, force)
    created_parent = not final.parent.exists()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _unique_sibling(final, "partial")
    tmp.mkdir()
    try:
        yield tmp
        _move_into_place(tmp, final, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_parent:
            with contextlib.suppress(OSError):
                final.parent.rmdir()
        raise


def _move_into_place(tmp: Path, final: Path, force: bool) -> None:
    """Rename ``tmp`` to ``final``, moving an old ``final`` aside first (only with ``force``)."""
    check_destination(final, force)
    old = None
    if final.exists():
        old = _unique_sibling(final, "old")
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        if old is not None:
            os.rename(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        logger.info("replaced the previous %s", final)
