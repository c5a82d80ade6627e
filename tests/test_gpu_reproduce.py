"""scripts/gpu_reproduce.sh: its dry run (plan, wheels, data), a whole run with stub commands, and the two
things it adds to scripts/lib.sh (TRAIN_DEVICE, TRAIN_DEADLINE)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_reproduce.sh"
LIB = ROOT / "scripts" / "lib.sh"
ITEM1_MODELS = ["w0-s1", "w1-s1", "w0-s2", "w1-s2", "w0-s3", "w1-s3", "w0.1-s1", "w10-s1", "moco-w1-s1"]
DATA_FILES = ["meta.json", "dict.txt"] + [f"{s}.{e}" for s in ("train", "valid", "test") for e in ("bin", "idx")]


def pins() -> list[str]:
    lines = (ROOT / "scripts" / "device_wheels.txt").read_text().splitlines()
    return [x for x in lines if x and not x.startswith("#")]


def fake_wheels(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for pin in pins():
        name, version = pin.split("==")
        (folder / f"{name.replace('-', '_')}-{version}-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    return folder


def fake_data(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in DATA_FILES:
        (folder / name).write_text('{"splits": {"train": {"tokens": 2088628}}}' if name == "meta.json" else "")
    return folder


def dry_run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {"PATH": "/usr/bin:/bin", "WHEELS": str(tmp_path / "whl"), "DATA": str(tmp_path / "data"), **env}
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), "--dry-run", *args],
                          capture_output=True, text=True, env=environ, timeout=60)


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_plans_every_model_and_at_most_8_outputs(tmp_path):
    fake_wheels(tmp_path / "whl")
    fake_data(tmp_path / "data")
    proc = dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every wheel and the data are present" in proc.stdout
    models = re.findall(r"^model  (\S+)", proc.stdout, flags=re.M)
    assert models == ITEM1_MODELS
    assert re.search(r"^model  w0-s1 .*\[temperature analysis\] \[xu2023 Table 1\]$", proc.stdout, flags=re.M)
    for phase in ("install", "train", "evaluate", "xu2023", "analyze", "report"):
        assert re.search(rf"^phase  {phase} ", proc.stdout, flags=re.M), phase
    assert "until 300 s" in proc.stdout and "until 530 s" in proc.stdout  # the hard limits, under 9 minutes
    outputs = re.findall(r"^output (\S+)$", proc.stdout, flags=re.M)
    assert 0 < len(outputs) <= 8 and all(Path(o).parent == tmp_path / "out" for o in outputs)
    assert "2088628 (train)" in proc.stdout
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_dry_run_names_missing_wheels_and_data_and_exits_2(tmp_path):
    proc = dry_run(tmp_path)
    assert proc.returncode == 2
    assert proc.stdout.count("MISSING from") == len(pins())
    assert "fetch_device_wheels.sh" in proc.stdout
    assert "knnlm prepare wikitext-2 --from DIR" in proc.stdout
    assert "something is missing" in proc.stdout


def test_dry_run_accepts_raw_text_to_prepare(tmp_path):
    fake_wheels(tmp_path / "whl")
    raw = tmp_path / "raw"
    raw.mkdir()
    for split in ("train", "valid"):
        (raw / f"wiki.{split}.tokens").write_text("a b\n")
    assert dry_run(tmp_path, "--from", str(raw)).returncode == 2  # wiki.test.tokens lacks
    (raw / "wiki.test.tokens").write_text("a b\n")
    proc = dry_run(tmp_path, "--from", str(raw))
    assert proc.returncode == 0 and f"prepared from {raw}" in proc.stdout


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {}, "OUT_DIR is required"),
        (["out", "--bogus"], {}, "unknown option"),
        (["out"], {"MODELS": "activation_l2:x:1"}, "a model is criterion:ω:seed"),
        (["out"], {"TRAIN_UNTIL": "600"}, "TRAIN_UNTIL < EVAL_UNTIL"),
        (["out"], {"DEVICE": "tpu"}, "DEVICE must be cuda or cpu"),
    ],
)
def test_bad_command_lines_exit_2(tmp_path, args, env, message):
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", **env}, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr


def lib(command: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, **env}
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source {LIB}; {command}"], capture_output=True,
                          text=True, cwd=cwd, env=environ, timeout=60)


def test_small_recipe_drops_cpu_on_the_gpu(tmp_path):
    show = 'set_train_args small; echo "${TRAIN_ARGS[*]}"'
    assert "--warmup-init-lr 1e-07 --cpu --num-workers 0" in lib(show, tmp_path).stdout
    gpu = lib(show, tmp_path, TRAIN_DEVICE="cuda").stdout
    assert "--cpu" not in gpu and "--arch knnlm_transformer_lm_small" in gpu and "--num-workers 0" in gpu


# one epoch per call, each 5% better than the one before (never a plateau), taking SLEEP seconds
STUB_TRAIN = """#!/usr/bin/env bash
while [ $# -gt 0 ]; do [ "$1" = --save-dir ] && dir=$2; [ "$1" = --max-epoch ] && epoch=$2; shift; done
sleep "$SLEEP"
touch "$dir/checkpoint_best.pt" "$dir/checkpoint_last.pt"
ppl=$(awk -v e="$epoch" 'BEGIN {print 500 * 0.95 ^ e}')
echo "x | INFO | train | epoch $(printf %03d "$epoch") | loss 9 | ppl 600 | train_wall $SLEEP |"
echo "x | INFO | valid | epoch $(printf %03d "$epoch") | valid on 'valid' subset | loss 9 | ppl $ppl | wps 1"
"""


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.mark.parametrize(("sleep", "seconds", "epochs"), [("1", 3, {1, 2, 3}), ("0.1", 60, {4})])
def test_train_deadline_stops_before_an_epoch_that_would_not_fit(tmp_path, sleep, seconds, epochs):
    _executable(tmp_path / "fairseq-train", STUB_TRAIN)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "SLEEP": sleep, "EPOCHS": "4",
           "TRAIN_DEADLINE": str(int(time.time()) + seconds)}
    proc = lib("train_lm small data ckpt 0 1 activation_l2", tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    done = len(re.findall(r"^epoch \d+: valid ppl", proc.stdout, flags=re.M))
    assert done in epochs
    stopped = "time" if seconds == 3 else "epochs"
    assert (tmp_path / "ckpt" / "train.stop").read_text().strip() == stopped
    # a model cut by the deadline is not final: a later call trains it further
    assert (tmp_path / "ckpt" / "train.done").exists() == (stopped != "time")


def test_train_deadline_cuts_an_epoch_that_runs_over(tmp_path):
    _executable(tmp_path / "fairseq-train", STUB_TRAIN)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "checkpoint_best.pt").touch()
    (ckpt / "train.log").write_text("x | INFO | valid | epoch 001 | valid on 'valid' subset | loss 9 | ppl 400 |\n")
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "SLEEP": "30", "TRAIN_DEADLINE": str(int(time.time()) + 2)}
    started = time.monotonic()
    proc = lib("train_lm small data ckpt 0 1 activation_l2", tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 15
    assert "epoch 2: cut at TRAIN_DEADLINE" in proc.stdout
    assert (ckpt / "train.stop").read_text().strip() == "time" and not (ckpt / "train.done").exists()


# --- a whole run with stub commands ---------------------------------------------------------------------

# python3: `-c CODE` succeeds (the import and GPU checks); `-m knnlm.cli.main` and `-m fairseq_cli.train`
# stand for knnlm and fairseq-train
STUB_PYTHON = """#!/usr/bin/env bash
echo "python $*" >> "$CALLS"
[ "$1" = -c ] && exit 0
module=$2
shift 2
case $module in
  fairseq_cli.train)
    while [ $# -gt 0 ]; do [ "$1" = --save-dir ] && dir=$2; [ "$1" = --max-epoch ] && epoch=$2; shift; done
    touch "$dir/checkpoint_best.pt" "$dir/checkpoint_last.pt"
    echo "x | INFO | train | epoch 00$epoch | loss 9 | ppl 600 | train_wall 3 |"
    echo "x | INFO | valid | epoch 00$epoch | valid on 'valid' subset | loss 7.$epoch | ppl 19$epoch | wps 1" ;;
  knnlm.cli.main)
    case "$1 $2" in
      "analyze temperature")
        while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
        mkdir -p "$out" && echo '{}' > "$out/temperature.json" && touch "$out/temperature.png" "$out/temperature.csv"
        echo "INFO | knnlm.analysis.temperature: ω=0: mean‖q‖² 100.0, τ=1 90.00, tuned τ=10 80.00" >&2 ;;
      "report "*)
        while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
        mkdir -p "$out" && printf '# knnlm report\\n\\n1 lines\\n\\n| a table |\\n' > "$out/report.md"
        touch "$out/ton2022_figure1_wikitext-2.png" ;;
    esac ;;
esac
"""

STUB_PIPELINE = """#!/usr/bin/env bash
echo "pipeline OUT=$OUT KEY_TYPES=$KEY_TYPES METRICS=$METRICS SEARCH=$SEARCH DEVICE=$DEVICE \
TEMPERATURES=${TEMPERATURES-unset} SCORE_ARGS=$SCORE_ARGS" >> "$CALLS"
mkdir -p "$OUT/datastore/$KEY_TYPES" "$OUT/cache/valid/knn/$KEY_TYPES-$METRICS-real" "$OUT/cache/test"
echo "{\\"out\\": \\"$OUT\\", \\"key_type\\": \\"$KEY_TYPES\\", \\"sim\\": \\"$METRICS\\"}" > "$OUT/results.jsonl"
printf 'step\\tseconds\\ndatastore\\t1\\n' > "$OUT/timings.tsv"
"""


@pytest.fixture
def sandbox(tmp_path) -> Path:
    """A repository-shaped folder: the real scripts, a stub pipeline, wheels and data-bin; a stub python3."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("gpu_reproduce.sh", "lib.sh", "device_wheels.txt"):
        shutil.copy(ROOT / "scripts" / name, repo / "scripts" / name)
    _executable(repo / "scripts" / "knnlm_pipeline.sh", STUB_PIPELINE)
    fake_wheels(repo / ".whl")
    fake_data(repo / "data-bin" / "wikitext-2")
    _executable(tmp_path / "python3", STUB_PYTHON)
    return repo


def test_a_stubbed_run_writes_at_most_8_files(sandbox):
    tmp = sandbox.parent
    calls = tmp / "calls.log"
    env = {"PATH": f"{tmp}:/usr/bin:/bin", "CALLS": str(calls), "SCRATCH": str(tmp / "scratch"),
           "DEVICE": "cpu", "EVAL_DISK_GB": "0", "XU_DISK_GB": "0", "MIN_FREE_GB": "0",
           "MODELS": "activation_l2:0:1 activation_l2:1:2 moco_queue:1:1"}
    proc = subprocess.run(["bash", str(sandbox / "scripts" / "gpu_reproduce.sh"), str(tmp / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp / "out"
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"results.jsonl", "training.tsv", "timings.tsv", "report.md", "run.log",
                                "temperature.json", "ton2022_figure1.png"} <= set(files)
    assert not (tmp / "scratch").exists()  # deleted without KEEP_SCRATCH=1
    log = calls.read_text().splitlines()
    trains = [c for c in log if c.startswith("python -m fairseq_cli.train")]
    # the stub's epochs never gain: four one-epoch calls per model (PATIENCE 3; with --cpu: DEVICE=cpu)
    assert len(trains) == 12 and all("--cpu" in t for t in trains)
    pipelines = [c for c in log if c.startswith("pipeline")]
    own = [c for c in pipelines if "/runs/xu2023" not in c]
    assert len(own) == 3 and all("KEY_TYPES=att METRICS=l2 SEARCH=exact DEVICE=cpu" in c for c in own)
    assert any("--label omega=1 --label seed=2 --label dataset=wikitext-2 --label criterion=activation_l2 "
               "--label train_ppl=600" in c for c in own)
    xu = [c for c in pipelines if "/runs/xu2023" in c]
    assert [re.search(r"KEY_TYPES=(\S+) METRICS=(\S+)", c).groups() for c in xu] == [
        ("att", "l2"), ("att", "ip"), ("ffn", "l2"), ("ffn", "ip")]
    assert all("TEMPERATURES=none" in c for c in xu)
    analysis = [c for c in log if "analyze temperature" in c]
    assert len(analysis) == 1 and analysis[0].count("--cache") == 1  # w0-s1 only: the other seed-1 model is moco
    assert "--mask-source real --score-source real" in analysis[0] and "--data-bin " in analysis[0]
    assert re.search(r"--shared-lm-cache \S*/runs/w0-s1/cache/valid --shared-lm-test-cache \S*/runs/w0-s1/cache/test",
                     analysis[0])
    reports = [c for c in log if "knnlm.cli.main report" in c]
    assert all("--where mask_source=real --where score_source=real" in r for r in reports)
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 3 + 4
    rows = (out / "training.tsv").read_text().splitlines()
    assert rows[0].endswith("epochs\tstopped_by") and len(rows) == 4
    assert all(r.split("\t")[-2:] == ["4", "plateau"] for r in rows[1:])
    report = (out / "report.md").read_text()
    assert "exact neighbours" in report and "IVF2048,PQ32" in report and "ω=0: mean‖q‖² 100.0" in report
    timings = (out / "timings.tsv").read_text()
    assert "main\tinstall" in timings and "w1-s2\ttrain" in timings and "xu2023\tevaluate" in timings
