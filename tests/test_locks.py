"""One writer per artifact: a second process is refused at once; a killed holder's lock is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from knnlm.errors import KnnlmError
from knnlm.io import LOCK_FILE, WriterLock

HOLD = """
import sys, time
from knnlm.io import WriterLock
with WriterLock.for_folder(sys.argv[1], "test artifact"):
    print("locked", flush=True)
    time.sleep(120)
"""


def start_holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_with_the_holders_pid_and_a_killed_holder_is_taken_over(tmp_path):
    holder = start_holder(tmp_path / "cache")
    try:
        with pytest.raises(KnnlmError, match=rf"pid {holder.pid}: .*-c"):
            with WriterLock.for_folder(tmp_path / "cache", "cache X"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with WriterLock.for_folder(tmp_path / "cache", "cache X"):  # the kernel dropped the dead holder's lock
        assert str(os.getpid()) in (tmp_path / "cache" / LOCK_FILE).read_text()


def test_the_cli_refuses_a_dump_into_a_cache_being_written(tmp_path):
    holder = start_holder(tmp_path / "cache")
    try:
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "knnlm.cli.main", "eval", "dump", "--checkpoint", str(tmp_path / "x.pt"),
             "--data", str(tmp_path), "--out", str(tmp_path / "cache")],
            capture_output=True, text=True, timeout=300,
        )
        assert time.monotonic() - t0 < 120  # refused at once, not after waiting
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2
    assert f"pid {holder.pid}" in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_an_output_path_that_cannot_be_a_folder_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(KnnlmError, match="cannot write"):
        with WriterLock.for_folder(tmp_path / "file" / "cache", "cache"):
            pass
