"""Committed results name artifacts relative to where the command ran, never by absolute paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

from knnlm.io import portable_paths

RESULTS = Path(__file__).resolve().parents[1] / "results"


def test_absolute_paths_become_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = {
        "knobs": {"checkpoint": "3f2a" * 16, "index": {"path": str(tmp_path / "idx" / "att.faiss"), "nprobe": 8}},
        "provenance": {"valid_cache": str(tmp_path / "runs" / "valid"), "datastore_path": "/elsewhere/ds/att",
                       "component_source": {"hf_model": "gpt2"}},
    }
    got = portable_paths(line)
    assert got["knobs"]["index"]["path"] == os.path.join("idx", "att.faiss")
    assert got["provenance"]["valid_cache"] == os.path.join("runs", "valid")
    assert not os.path.isabs(got["provenance"]["datastore_path"])
    assert got["knobs"]["checkpoint"] == line["knobs"]["checkpoint"]  # a fingerprint, not a path
    assert got["provenance"]["component_source"] == {"hf_model": "gpt2"}


def test_committed_results_hold_no_absolute_paths():
    def absolute(obj):
        if isinstance(obj, dict):
            return [p for v in obj.values() for p in absolute(v)]
        if isinstance(obj, list):
            return [p for v in obj for p in absolute(v)]
        return [obj] if isinstance(obj, str) and obj.startswith("/") and "/" in obj[1:] else []

    found = {}
    for path in [*RESULTS.rglob("*.jsonl"), *RESULTS.rglob("*.json")]:
        text = path.read_text()
        lines = text.splitlines() if path.suffix == ".jsonl" else [text]
        records = [json.loads(x) for x in lines if x.strip()]
        if paths := absolute(records):
            found[str(path.relative_to(RESULTS))] = paths[:3]
    assert not found


def test_append_jsonl_cuts_a_torn_last_line_and_never_merges_records(tmp_path, caplog):
    from knnlm.io import append_jsonl

    out = tmp_path / "results.jsonl"
    append_jsonl(out, {"a": 1})
    with open(out, "ab") as f:
        f.write(b'{"b": 2, "trunc')  # a writer killed mid-line
    append_jsonl(out, {"c": 3})
    assert [json.loads(x) for x in out.read_text().splitlines()] == [{"a": 1}, {"c": 3}]
    assert "torn line" in caplog.text
    out.write_bytes(b'{"only": "torn')  # no newline anywhere
    append_jsonl(out, {"d": 4})
    assert out.read_text() == '{"d": 4}\n'


def test_concurrent_appends_never_interleave(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "results.jsonl"
    code = ("import sys; from knnlm.io import append_jsonl\n"
            "for i in range(200): append_jsonl(sys.argv[1], {'worker': sys.argv[2], 'i': i, 'pad': 'x' * 5000})")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out), str(w)]) for w in range(3)]
    assert all(p.wait() == 0 for p in procs)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 600
    assert {(x["worker"], x["i"]) for x in lines} == {(str(w), i) for w in range(3) for i in range(200)}
