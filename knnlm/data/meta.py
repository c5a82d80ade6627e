"""``meta.json`` of a prepared data folder: what went in, how it was tokenized, what came out.

It is written last, atomically, so its presence marks a complete folder. Later
steps (training, datastores, evaluation) read it with :func:`read_data_meta` and
use ``dictionary.sha256`` as the fingerprint of the vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knnlm.data.binarize import SplitStats
from knnlm.data.files import META_FILE, atomic_write_json, file_digest
from knnlm.errors import KnnlmError

FORMAT = "knnlm/data-bin"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SourceInfo:
    """A raw input file: where it came from, its checksum, its counts, and how it was checked."""

    file: str
    sha256: str
    bytes: int
    lines: int
    words: int
    check: str


@dataclass(frozen=True)
class TokenizationInfo:
    """``word`` (the corpus' own whitespace tokens) or ``sentencepiece`` (BPE model kept in the folder)."""

    kind: str
    vocab_size: int | None = None
    seed: int | None = None
    model_file: str | None = None
    model_sha256: str | None = None
    trainer_options: dict[str, Any] | None = None


@dataclass(frozen=True)
class DictionaryInfo:
    """fairseq's ``dict.txt``; ``size`` is ``len(Dictionary)``: special symbols and padding included."""

    file: str
    size: int
    sha256: str
    special_symbols: int


@dataclass(frozen=True)
class DataMeta:
    """Everything recorded about a prepared data folder; ``path`` is the folder it was read from."""

    name: str
    dataset: str
    tokenization: TokenizationInfo
    dictionary: DictionaryInfo
    splits: dict[str, SplitStats]
    sources: dict[str, SourceInfo]
    knnlm_version: str
    fairseq_version: str
    binarizer_options: list[str]
    created_utc: str
    path: Path | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        del fields["path"]
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **fields}

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path | None = None) -> DataMeta:
        fields = {k: v for k, v in data.items() if k not in ("format", "format_version")}
        fields["tokenization"] = TokenizationInfo(**fields["tokenization"])
        fields["dictionary"] = DictionaryInfo(**fields["dictionary"])
        fields["splits"] = {k: SplitStats(**v) for k, v in fields["splits"].items()}
        fields["sources"] = {k: SourceInfo(**v) for k, v in fields["sources"].items()}
        return cls(**fields, path=path)


def write_data_meta(folder: Path, meta: DataMeta) -> Path:
    """Write ``folder/meta.json`` atomically; call it last, once every other file is complete."""
    path = folder / META_FILE
    atomic_write_json(path, meta.to_json())
    return path


def read_data_meta(path: Path | str, verify: bool = True) -> DataMeta:
    """Read a prepared folder's ``meta.json`` (``path`` is the folder or the file itself).

    With ``verify`` also check that ``dict.txt``, the SentencePiece model and every
    split's ``.bin``/``.idx`` are present and that the checksummed files are unchanged.
    """
    path = Path(path)
    folder = path.parent if path.name == META_FILE else path
    meta_file = folder / META_FILE
    rebuild = "rebuild it with `knnlm prepare ... --force`"
    if not folder.is_dir():
        raise KnnlmError(f"{folder}: no such data folder; create it with `knnlm prepare`")
    if not meta_file.is_file():
        raise KnnlmError(
            f"{meta_file}: missing, so {folder} is not a complete `knnlm prepare` output "
            f"(half-written, or made by plain fairseq-preprocess); {rebuild}"
        )
    meta = _parse(meta_file, folder, rebuild)
    if verify:
        _verify_files(meta, folder, rebuild)
    return meta


def _parse(meta_file: Path, folder: Path, rebuild: str) -> DataMeta:
    try:
        data = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise KnnlmError(f"{meta_file}: unreadable ({err}); {rebuild}") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise KnnlmError(f"{meta_file}: not a knnlm data-bin meta.json; {rebuild}")
    if data.get("format_version") != FORMAT_VERSION:
        raise KnnlmError(
            f"{meta_file}: format version {data.get('format_version')}, this knnlm reads "
            f"version {FORMAT_VERSION}; {rebuild}, or use the knnlm version that wrote it"
        )
    try:
        return DataMeta.from_json(data, path=folder)
    except (KeyError, TypeError, AttributeError) as err:
        raise KnnlmError(f"{meta_file}: missing or unexpected fields ({err}); {rebuild}") from err


def _verify_files(meta: DataMeta, folder: Path, rebuild: str) -> None:
    checksummed = [(meta.dictionary.file, meta.dictionary.sha256)]
    if meta.tokenization.model_file:
        checksummed.append((meta.tokenization.model_file, meta.tokenization.model_sha256))
    for name, sha256 in checksummed:
        file = folder / name
        if not file.is_file():
            raise KnnlmError(f"{file}: missing from the prepared folder; {rebuild}")
        if file_digest(file) != sha256:
            raise KnnlmError(f"{file}: changed since it was prepared (SHA-256 differs); {rebuild}")
    for split in meta.splits:
        for suffix in (".bin", ".idx"):
            file = folder / f"{split}{suffix}"
            if not file.is_file():
                raise KnnlmError(f"{file}: missing from the prepared folder; {rebuild}")
