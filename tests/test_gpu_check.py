"""benchmarks/gpu_check.sh --dry-run: its plan, and which of the wheels it would carry are there."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dry_run(wheels: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--dry-run"],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "WHEELS": str(wheels)}, timeout=60,
    )


def pins() -> list[str]:
    lines = (ROOT / "scripts" / "device_wheels.txt").read_text().splitlines()
    return [x for x in lines if x and not x.startswith("#")]


def test_dry_run_prints_the_plan_and_finds_every_wheel(tmp_path):
    for pin in pins():
        name, version = pin.split("==")
        (tmp_path / f"{name.replace('-', '_')}-{version}-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    proc = dry_run(tmp_path, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "every wheel is present" in proc.stdout
    for step in ("install", "tests", "eval", "build"):
        assert f"plan   {step}" in proc.stdout
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_dry_run_names_the_missing_wheels(tmp_path):
    proc = dry_run(tmp_path, tmp_path / "out")
    assert proc.returncode == 0
    assert proc.stdout.count("MISSING") == len(pins())
    assert "fetch_device_wheels.sh" in proc.stdout
