"""Shared fixtures: a small binarized slice of the bundled corpus and tiny checkpoints.

Everything is built once per test session under pytest's tmp dir, offline and on CPU.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import knnlm

knnlm.register()  # fairseq architectures, criteria and tasks by name, whatever a test imports first
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only add contention

DEMO_CORPUS = Path(__file__).resolve().parents[1] / "knnlm" / "resources" / "demo_corpus"

# lines of each split kept for the test corpus (whole lines of the bundled slice)
TEST_SLICE_LINES = {"train": 400, "valid": 60, "test": 60}


def write_text_slice(dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for split, n in TEST_SLICE_LINES.items():
        with gzip.open(DEMO_CORPUS / f"wiki.{split}.tokens.gz", "rt", encoding="utf-8") as f:
            lines = [next(f) for _ in range(n)]
        (dst / f"wiki.{split}.tokens").write_text("".join(lines), encoding="utf-8")
    return dst


def with_python_on_path() -> dict[str, str]:
    """This environment with the running interpreter's folder first on PATH (scripts call `python`)."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def run_module(module: str, args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m module args` and fail the test with its output if it fails."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def text_slice(tmp_path_factory) -> Path:
    """Raw `wiki.{train,valid,test}.tokens` files: a few hundred lines of the bundled corpus."""
    return write_text_slice(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="session")
def tiny_data_bin(text_slice, tmp_path_factory) -> Path:
    """fairseq-binarized (word-level, `--only-source`) version of `text_slice`."""
    dest = tmp_path_factory.mktemp("data-bin") / "tiny"
    run_module(
        "fairseq_cli.preprocess",
        [
            "--only-source",
            "--trainpref", str(text_slice / "wiki.train.tokens"),
            "--validpref", str(text_slice / "wiki.valid.tokens"),
            "--testpref", str(text_slice / "wiki.test.tokens"),
            "--destdir", str(dest),
            "--workers", "1",
        ],
    )
    return dest


def train_tiny(data_bin: Path, save_dir: Path, extra: list[str] = ()) -> Path:
    """A few fairseq-train updates of `knnlm_transformer_lm_tiny`; returns checkpoint_last.pt."""
    run_module(
        "fairseq_cli.train",
        [
            str(data_bin),
            "--user-dir", str(Path(__file__).resolve().parents[1] / "knnlm"),
            "--task", "language_modeling",
            "--arch", "knnlm_transformer_lm_tiny",
            "--tokens-per-sample", "64",
            "--max-tokens", "512",
            "--optimizer", "adam", "--lr", "0.001",
            "--max-update", "6",
            "--save-dir", str(save_dir),
            "--no-epoch-checkpoints", "--no-progress-bar",
            "--seed", "1", "--cpu", "--num-workers", "0",
            *extra,
        ],
    )
    return save_dir / "checkpoint_last.pt"


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_data_bin, tmp_path_factory) -> Path:
    """A `knnlm_transformer_lm_tiny` checkpoint trained for a few updates on `tiny_data_bin`."""
    return train_tiny(tiny_data_bin, tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(autouse=True)
def restore_hydra_version_base():
    """Hydra's version base is process-global: a test composing with version_base="1.3" would make
    fairseq's in-process config conversion (hydra.experimental.initialize) refuse in later tests."""
    from hydra.version import VersionBase

    base = VersionBase.instance()
    previous = base.getbase()  # may be hydra's "unspecified" sentinel, which setbase() refuses
    yield
    base.version_base = previous


@pytest.fixture(autouse=True)
def restore_root_logging() -> Iterator[None]:
    """``knnlm.cli.main`` run in-process points the root logger at the ``sys.stderr`` of that moment: pytest's
    capture of one test, closed after it. Put the root logger back so later tests never log into a closed file."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models and matmuls: on a shared 2-core box, torch's threads only spin (often ~100x slower).

    Modules ask for it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
