"""What the ``knnlm`` command prints: its own lines, not the loader chatter of its libraries."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

CHATTER = re.compile(r"^(DEBUG|INFO)[:| ]|faiss\.loader|matplotlib|tensorboardX", re.MULTILINE)


def knnlm(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from knnlm.cli.main import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args", [["--help"], ["score", "--help"], ["datastore", "build", "--help"]])
def test_help_prints_no_library_logging(args):
    proc = knnlm(*args)
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: knnlm")
    assert not CHATTER.search(proc.stdout + proc.stderr), proc.stderr


def test_user_errors_are_one_line_and_verbose_shows_the_traceback(tmp_path):
    missing = str(tmp_path / "nope")
    proc = knnlm("datastore", "info", missing)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "error:" in proc.stderr and missing in proc.stderr
    verbose = knnlm("-v", "datastore", "info", missing)
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr


@pytest.mark.parametrize(
    ("module", "inputs"),
    [("knnlm.cli.index", ["datastore=nope"]), ("knnlm.cli.datastore", ["checkpoint=nope.pt", "data=."])],
)
def test_the_hydra_apps_start_as_quietly(module, inputs, tmp_path):
    """`python -m knnlm.cli.<job>` imports fairseq and faiss before hydra starts: no chatter from them either."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *inputs, "out=x", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and ": error: " in proc.stderr, proc.stderr
