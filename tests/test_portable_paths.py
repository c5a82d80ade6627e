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
