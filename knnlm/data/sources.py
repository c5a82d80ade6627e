"""Where raw corpora come from: WikiText archives (downloaded or offline), plain files, the demo corpus.

Each source resolves to one :class:`RawSplit` per split: a plain UTF-8 text file
plus what is known about it (a published checksum, or an archive that vouches for it).
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tqdm import tqdm

from knnlm.data.files import CHUNK_BYTES, file_digest
from knnlm.errors import KnnlmError

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
DOWNLOAD_TIMEOUT_S = 60


def raw_file_name(split: str) -> str:
    """The WikiText file name of a split, e.g. ``wiki.train.tokens``."""
    return f"wiki.{split}.tokens"


@dataclass(frozen=True)
class RawSplit:
    """One split's raw text file.

    ``expected_sha256`` is a published checksum the file must match;
    ``vouched_by`` names a checksum-verified archive the file was extracted from;
    ``verify_skipped`` says a known checksum was waived (``--no-verify``);
    ``option`` is the command-line option that named the file, for error messages;
    ``origin`` is what ``meta.json`` records as the source when ``path`` is a temporary copy.
    """

    path: Path
    expected_sha256: str | None = None
    vouched_by: str | None = None
    verify_skipped: bool = False
    option: str | None = None
    origin: str | None = None


@dataclass(frozen=True)
class WikiTextSpec:
    """A WikiText release: its archive, the archive's MD5, and known SHA-256 of the raw files."""

    name: str
    url: str
    archive_md5: str
    sha256: Mapping[str, str]

    @property
    def archive_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


# Archive MD5s as published by torchtext; raw-file SHA-256s from the offline copies
# documented for this project (WikiText-103 train has none on record).
WIKITEXT: dict[str, WikiTextSpec] = {
    "wikitext-2": WikiTextSpec(
        name="wikitext-2",
        url="https://wikitext.smerity.com/wikitext-2-v1.zip",
        archive_md5="542ccefacc6c27f945fb54453812b3cd",
        sha256={
            "train": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
            "valid": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
            "test": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        },
    ),
    "wikitext-103": WikiTextSpec(
        name="wikitext-103",
        url="https://wikitext.smerity.com/wikitext-103-v1.zip",
        archive_md5="9ddaacaf6af0710eda8c456decff7832",
        sha256={
            "valid": "9aee9f52d6e77de6c7751fc5e7c44287db3ec0eaf15477098acc6b93c1c4250b",
            "test": "56db52eb157b1ab5c89646eef70510c1eca6e12a3bfdb99f0d6b05b4eacb75b9",
        },
    ),
}


def wikitext_splits(
    spec: WikiTextSpec, source: Path | None, workdir: Path, downloads: Path, verify: bool
) -> dict[str, RawSplit]:
    """Resolve a WikiText release from a folder of raw files, a local archive, or the public mirror.

    ``workdir`` receives extracted files; ``downloads`` keeps a downloaded archive
    so that a rebuild (e.g. with ``--force`` or another ``--bpe``) does not fetch it again.
    """
    if source is None:
        archive = download_archive(spec, downloads)
        return extract_wikitext(spec, archive, workdir, verify=True)
    if source.is_dir():
        return {
            split: RawSplit(
                source / raw_file_name(split),
                expected_sha256=spec.sha256.get(split) if verify else None,
                verify_skipped=not verify,
                option="--from",
            )
            for split in SPLITS
        }
    if source.is_file():
        return extract_wikitext(spec, source, workdir, verify=verify)
    raise KnnlmError(
        f"--from {source}: no such file or folder; give the folder holding "
        f"{', '.join(raw_file_name(s) for s in SPLITS)} or the {spec.archive_name} archive"
    )


def download_archive(spec: WikiTextSpec, downloads: Path) -> Path:
    """Download ``spec``'s archive into ``downloads`` (reusing a verified earlier download)."""
    target = downloads / spec.archive_name
    if target.is_file() and file_digest(target, "md5") == spec.archive_md5:
        logger.info("using the earlier download %s", target)
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    logger.info("downloading %s to %s", spec.url, target)
    try:
        _fetch(spec.url, part)
    except (urllib.error.URLError, OSError) as err:
        part.unlink(missing_ok=True)
        raise KnnlmError(
            f"could not download {spec.url} ({err}); download it by other means and pass "
            f"--from path/to/{spec.archive_name} (or the folder holding the extracted wiki.*.tokens)"
        ) from err
    md5 = file_digest(part, "md5")
    if md5 != spec.archive_md5:
        part.unlink(missing_ok=True)
        raise KnnlmError(
            f"{spec.url}: the download's MD5 {md5} is not the published {spec.archive_md5}; "
            f"the mirror served another file: retry later or pass --from a copy you trust"
        )
    os.replace(part, target)
    return target


def _fetch(url: str, dest: Path) -> None:
    """Stream ``url`` into ``dest`` with a progress bar."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        name = dest.name.removesuffix(".part")
        with tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=None) as bar:
            for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                out.write(chunk)
                bar.update(len(chunk))


def extract_wikitext(spec: WikiTextSpec, archive: Path, workdir: Path, verify: bool) -> dict[str, RawSplit]:
    """Check a WikiText archive's MD5 (when ``verify``); extract its ``wiki.*.tokens`` into ``workdir``."""
    if verify:
        md5 = file_digest(archive, "md5")
        if md5 != spec.archive_md5:
            raise KnnlmError(
                f"{archive}: MD5 {md5} is not the published {spec.archive_md5} of {spec.archive_name}; "
                f"get a fresh copy, or pass --no-verify to use it anyway"
            )
    vouched_by = f"{spec.archive_name} (md5 {spec.archive_md5})" if verify else None
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = {Path(info.filename).name: info for info in zf.infolist() if not info.is_dir()}
            splits = {}
            for split in SPLITS:
                info = members.get(raw_file_name(split))
                if info is None:
                    raise KnnlmError(
                        f"{archive}: has no {raw_file_name(split)}; pass the {spec.archive_name} archive"
                    )
                dest = workdir / raw_file_name(split)
                with zf.open(info) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK_BYTES)
                splits[split] = RawSplit(
                    dest,
                    expected_sha256=spec.sha256.get(split) if verify else None,
                    vouched_by=vouched_by,
                    verify_skipped=not verify,
                    origin=f"{archive.resolve()}:{info.filename}",
                )
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as err:
        raise KnnlmError(
            f"{archive}: unreadable zip archive ({err}); delete it and download {spec.url} again"
        ) from err
    return splits


def demo_splits(workdir: Path) -> dict[str, RawSplit]:
    """Decompress the bundled demo corpus (a slice of WikiText-2) into ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = resources.files("knnlm") / "resources" / "demo_corpus"
    splits = {}
    for split in SPLITS:
        dest = workdir / raw_file_name(split)
        with resources.as_file(corpus / f"{raw_file_name(split)}.gz") as gz_path:
            try:
                with gzip.open(gz_path, "rb") as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK_BYTES)
            except (OSError, EOFError) as err:
                raise KnnlmError(
                    f"{gz_path}: the bundled demo corpus is missing or damaged ({err}); reinstall knnlm"
                ) from err
        splits[split] = RawSplit(dest, origin=f"knnlm/resources/demo_corpus/{raw_file_name(split)}.gz")
    return splits
