"""Ton et al. (2022) in `knnlm report` and the scripts that reproduce it (ton2022.sh, xu2023.sh).

The renderers run on synthetic result lines (2 ω × 2 seeds) whose means and sample standard
deviations were worked out by hand. The scripts run with stub `fairseq-train`, `knnlm` and
pipeline commands inside a copy of the scripts folder, which checks the command lines and the
labels they produce without training anything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from knnlm.report import RENDERERS, load_results, render_report
from knnlm.report.registry import RenderContext
from knnlm.report.ton2022 import CURVES, collect, curve_points

from .conftest import with_python_on_path
from .test_report import PNG_MAGIC, result, write_lines

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
PARTS = ["ton2022_table", "ton2022_figure1"]
TAUS = "0.1:3.0:0.1,4,5,7,10,15,20,30,50,100"  # scripts/lib.sh default_temperatures

# (ω, seed): train ppl, LM ppl, kNN-LM at tuned λ, tuned λ, kNN-LM at λ=0.3 (None: no λ=0.3 line)
RUNS = {
    (0, 1): (60.0, 76.0, 74.0, 0.25, 74.2),
    (0, 2): (64.0, 77.0, 75.0, 0.35, 75.4),
    (1, 1): (61.0, 76.2, 70.5, 0.30, None),
    (1, 2): (61.0, 76.4, 70.9, 0.30, None),
}


# (ω, seed): valid perplexity at τ = 0.5, 1, 2, 5: best at τ 2 and 5 (ω=0), at 0.5 (ω=1; the sweep's edge)
SWEEP_TAUS = (0.5, 1.0, 2.0, 5.0)
SWEEPS = {
    (0, 1): (80.0, 74.0, 70.0, 72.0),
    (0, 2): (81.0, 75.0, 73.0, 71.0),
    (1, 1): (69.0, 70.5, 72.0, 75.0),
    (1, 2): (69.5, 70.9, 72.0, 75.0),
}


def ton_lines(dataset: str = "wikitext-2") -> list[dict]:
    """The lines `knnlm score` writes for these runs, plus lines the tables must not pick up."""
    records = []
    for (omega, seed), (train, lm, tuned, lam, fixed) in RUNS.items():
        labels = {"omega": omega, "seed": seed, "train_ppl": train, "dataset": dataset, "cache": "full"}
        index = {"factory": "IVF2048,PQ32", "nprobe": 32, "path": f"runs/w{omega}-s{seed}/index/att.l2.faiss"}
        knobs = {"split": "valid", "labels": labels, "checkpoint": f"sha256:{dataset}-{omega}-{seed}", "index": index}
        records.append(result({"lm_ppl": lm, "interp_ppl": tuned, "lambda_used": lam}, **knobs))
        if fixed is not None:
            records.append(result({"lm_ppl": lm, "interp_ppl": fixed, "lambda_used": 0.3}, **knobs, **{"lambda": 0.3}))
        # other λ, the test split and the ffn key: never in the table
        records.append(result({"lm_ppl": lm, "interp_ppl": 1.0, "lambda_used": 0.25}, **knobs, **{"lambda": 0.25}))
        # the τ sweep: test-split lines that carry the valid perplexity at each τ (λ tuned at each)
        for tau, valid in zip(SWEEP_TAUS, SWEEPS[omega, seed], strict=True):
            sweep = {**knobs, "split": "test", "temperature": tau}
            records.append(result({"lm_ppl": 1.0, "interp_ppl": 1.0, "valid_interp_ppl": valid}, **sweep))
        records.append(result({"lm_ppl": lm, "interp_ppl": 1.0}, key_type="ffn", **knobs))
    return records


def render(tmp_path: Path, records: list[dict], **where) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    lines = load_results([write_lines(tmp_path / "results.jsonl", records)])
    return {r.name: r for r in render_report(lines, tmp_path / "out", names=PARTS, where=where)}


def test_table_shows_mean_std_over_seeds_and_reports_missing(tmp_path):
    rendered = render(tmp_path, ton_lines())
    table = rendered["ton2022_table"]
    md = table.markdown
    # ω=0: train 60, 64 -> 62.00 ± 2.83; LM 76, 77 -> 76.50 ± 0.71; λ=0.3: 74.2, 75.4 -> 74.80 ± 0.85;
    # tuned: 74, 75 -> 74.50 ± 0.71 with λ 0.25, 0.35 -> 0.30 ± 0.07
    # tuned τ: 70 (τ 2) and 71 (τ 5) -> 70.50 ± 0.71
    assert (
        "| 0 | 2 (1, 2) | 62.00 ± 2.83 (n=2) | 76.50 ± 0.71 (n=2) | 74.80 ± 0.85 (n=2) | 74.50 ± 0.71 (n=2) "
        "| 0.30 ± 0.07 (n=2) | 70.50 ± 0.71 (n=2) | 2, 5 (edge) |" in md
    )
    # ω=1: no λ=0.3 line for either seed -> "missing", never filled from another λ; tuned τ: 69, 69.5 at τ 0.5
    assert (
        "| 1 | 2 (1, 2) | 61.00 ± 0.00 (n=2) | 76.30 ± 0.14 (n=2) | missing | 70.70 ± 0.28 (n=2) | 0.30 ± 0.00 (n=2) "
        "| 69.25 ± 0.35 (n=2) | 0.5 (edge), 0.5 (edge) |" in md
    )
    assert "| 0.1 | 0 | missing | missing | missing | missing | missing | – | – |" in md
    assert "WIKI-2 (the paper's Table 1; labels.dataset=wikitext-2)" in md and "74.11 at ω=0 → 70.63 at ω=1" in md
    edge = "the optimum may lie beyond it"
    assert table.missing == [
        f"ω=0, tuned τ: at the edge of the τ sweep (seed 2: 0.5–5); {edge}",
        "ω=0.1: no line with labels.dataset=wikitext-2, labels.omega=0.1, lambda=tune or 0.3 (and the fixed knobs)",
        "ω=1, kNN-LM λ=0.3: no line with labels.dataset=wikitext-2, labels.omega=1, lambda=0.3 (and the fixed knobs)",
        f"ω=1, tuned τ: at the edge of the τ sweep (seed 1: 0.5–5; seed 2: 0.5–5); {edge}",
        "ω=10: no line with labels.dataset=wikitext-2, labels.omega=10, lambda=tune or 0.3 (and the fixed knobs)",
    ]
    assert (tmp_path / "out" / "ton2022_table.md").read_text() == md
    assert "Fixed: split=valid, key_type=att, similarity=l2, mask_source=faiss" in md


def test_a_seed_without_a_line_is_flagged_and_where_overrides(tmp_path):
    records = [r for r in ton_lines() if not (r["knobs"]["labels"]["seed"] == 2 and r["knobs"]["lambda"] == 0.3)]
    md = render(tmp_path, records)["ton2022_table"]
    assert "| 74.20 (n=1) |" in md.markdown
    assert "ω=0, kNN-LM λ=0.3: no line for seed(s) 2 (other columns have them)" in md.missing
    one_seed = render(tmp_path / "w", ton_lines(), **{"labels.seed": 1, "labels.omega": [0, 1]})["ton2022_table"]
    assert "| 0 | 1 (1) | 60.00 | 76.00 | 74.20 | 74.00 | 0.25 |" in one_seed.markdown
    assert "| 0.1 |" not in one_seed.markdown and "labels.seed=1" in one_seed.markdown


def test_tuned_tau_is_chosen_on_valid_per_seed_and_a_missing_sweep_is_said(tmp_path):
    # without ω=1 seed 2's sweep, and with ω=0 seed 1 retrained (a new checkpoint): only its new sweep counts
    records = [r for r in ton_lines() if not (r["knobs"]["split"] == "test" and r["knobs"]["labels"]["omega"] == 1
                                              and r["knobs"]["labels"]["seed"] == 2)]
    retrained = [dict(r, knobs={**r["knobs"], "checkpoint": "sha256:retrained"}) for r in ton_lines()
                 if r["knobs"]["labels"]["omega"] == 0 and r["knobs"]["labels"]["seed"] == 1]
    for r in retrained:
        if r["knobs"]["split"] == "test":
            r["metrics"] = {**r["metrics"], "valid_interp_ppl": 90.0 - r["knobs"]["temperature"]}  # best at τ 5
    table = render(tmp_path, records + retrained)["ton2022_table"]
    assert "| 70.50 ± 0.71 (n=2) | 2, 5 (edge) |" not in table.markdown
    assert "| 78.00 ± 9.90 (n=2) | 5 (edge), 5 (edge) |" in table.markdown  # 85 (retrained seed 1) and 71
    assert "| 69.00 (n=1) | 0.5 (edge) |" in table.markdown
    assert ("ω=1, kNN-LM tuned τ: no τ sweep (test-split lines with valid_interp_ppl) for seed(s) 2"
            in table.missing)


def test_lines_that_differ_in_an_unfixed_knob_are_ambiguous(tmp_path):
    records = ton_lines()
    records.append(
        result(
            {"interp_ppl": 50.0},
            split="valid",
            index={"factory": "Flat", "nprobe": 1},
            labels={"omega": 0, "seed": 1, "dataset": "wikitext-2"},
        )
    )
    table = render(tmp_path, records)["ton2022_table"]
    assert (
        "| 0 | 2 (1, 2) | 62.00 ± 2.83 (n=2) | 76.50 ± 0.71 (n=2) | 74.80 ± 0.85 (n=2) | ambiguous |" in table.markdown
    )
    assert any("ω=0, kNN-LM tuned λ: lines differ in index.factory, index.nprobe" in m for m in table.missing)
    # a τ sweep line from another index: the tuned-τ cell is ambiguous too, not a minimum over both
    records.append(result({"valid_interp_ppl": 10.0}, temperature=3.0, index={"factory": "Flat", "nprobe": 1},
                          labels={"omega": 1, "seed": 1, "dataset": "wikitext-2"}))
    table = render(tmp_path / "sweep", records)["ton2022_table"]
    assert "| 0.30 ± 0.00 (n=2) | ambiguous | – |" in table.markdown
    assert "ω=1, kNN-LM tuned τ: lines differ in index.factory, index.nprobe, labels.cache" in table.missing


def test_each_dataset_gets_its_own_table_and_figure(tmp_path):
    rendered = render(tmp_path, ton_lines("wikitext-2") + ton_lines("wikitext-103"))
    md = rendered["ton2022_table"].markdown
    assert "#### WIKI-2 (the paper's Table 1" in md and "#### WIKI-103 (the paper's Table 2" in md
    assert "16.09 at ω=0 → 15.89 at ω=1" in md
    assert md.count("| 0 | 2 (1, 2) | 62.00 ± 2.83 (n=2) |") == 2
    files = rendered["ton2022_figure1"].files
    assert [f.name for f in files] == ["ton2022_figure1_wikitext-2.png", "ton2022_figure1_wikitext-103.png"]


def test_figure_is_a_png_and_lists_what_it_lacks(tmp_path):
    figure = render(tmp_path, ton_lines())["ton2022_figure1"]
    (png,) = figure.files
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert "](ton2022_figure1_wikitext-2.png)" in figure.markdown
    assert figure.missing == [
        "ω=0.1, 10: no lines (see ton2022_table)",
        "kNN-LM, λ=0.3, ω=1: missing (see ton2022_table)",
    ]


def test_figure_draws_each_models_tuned_tau_and_says_when_a_sweep_lacks(tmp_path):
    (tau_curve,) = [c for c in CURVES if c.cell == "tuned_tau"]
    lines = load_results([write_lines(tmp_path / "results.jsonl", ton_lines())])
    _, (block,) = collect(lines, RenderContext(out_dir=tmp_path, where={}))
    missing: list[str] = []
    points = curve_points([row for row in block.rows if not row.absent], tau_curve, missing)
    # best valid perplexity of each seed's sweep: ω=0: 70 and 71; ω=1: 69 and 69.5
    assert [(w, round(m, 4), round(s, 4)) for w, m, s in points] == [(0.0, 70.5, 0.7071), (1.0, 69.25, 0.3536)]
    assert missing == []
    no_sweep = [r for r in ton_lines() if not (r["knobs"]["split"] == "test" and r["knobs"]["labels"]["omega"] == 1)]
    figure = render(tmp_path / "no-sweep", no_sweep)["ton2022_figure1"]
    assert "kNN-LM, tuned τ and λ, ω=1: missing (see ton2022_table)" in figure.missing


def moco_lines() -> list[dict]:
    """An Eq. 1 model (moco_queue) at ω=1 seed 1: the same knobs as the Eq. 2 model but the criterion."""
    labels = {"omega": 1, "seed": 1, "train_ppl": 58.0, "dataset": "wikitext-2", "cache": "full",
              "criterion": "moco_queue"}
    knobs = {"split": "valid", "labels": labels, "checkpoint": "sha256:moco", "index": {"factory": "IVF2048,PQ32",
             "nprobe": 32, "path": "runs/moco-w1-s1/index/att.l2.faiss"}}
    records = [result({"lm_ppl": 75.0, "interp_ppl": 71.5, "lambda_used": 0.2}, **knobs),
               result({"lm_ppl": 75.0, "interp_ppl": 72.0, "lambda_used": 0.3}, **knobs, **{"lambda": 0.3})]
    for tau, valid in ((0.5, 71.0), (1.0, 71.5)):
        records.append(result({"valid_interp_ppl": valid}, **{**knobs, "split": "test", "temperature": tau}))
    return records


def test_eq1_models_get_their_own_row_and_stay_out_of_the_omega_sweep(tmp_path):
    eq2 = [dict(r, knobs={**r["knobs"], "labels": {**r["knobs"]["labels"], "criterion": "activation_l2"}})
           for r in ton_lines() if r["knobs"]["labels"]["omega"] == 1]
    rendered = render(tmp_path, ton_lines() + moco_lines())
    table = rendered["ton2022_table"]
    # the ω=1 row is the Eq. 2 models' alone, exactly as without the moco lines
    assert (
        "| 1 | 2 (1, 2) | 61.00 ± 0.00 (n=2) | 76.30 ± 0.14 (n=2) | missing | 70.70 ± 0.28 (n=2) | 0.30 ± 0.00 (n=2) "
        "| 69.25 ± 0.35 (n=2) | 0.5 (edge), 0.5 (edge) |" in table.markdown
    )
    assert ("| 1, Eq. 1 (moco_queue) | 1 (1) | 58.00 | 75.00 | 72.00 | 71.50 | 0.20 | 71.00 | 0.5 (edge) |"
            in table.markdown)
    assert table.markdown.index("| 10 |") < table.markdown.index("| 1, Eq. 1 (moco_queue) |")
    assert "Eq. 1 (moco_queue), ω=1, tuned τ: at the edge of the τ sweep (seed 1: 0.5–1)" in table.missing[-1]
    # labelled activation_l2 lines are the same Eq. 2 rows as unlabelled ones
    labelled = render(tmp_path / "labelled", [r for r in ton_lines() if r["knobs"]["labels"]["omega"] != 1] + eq2)
    assert "| 1 | 2 (1, 2) | 61.00 ± 0.00 (n=2) | 76.30 ± 0.14 (n=2) |" in labelled["ton2022_table"].markdown
    only_moco = render(tmp_path / "only", ton_lines() + moco_lines(), **{"labels.criterion": "moco_queue"})
    assert "| 0 |" not in only_moco["ton2022_table"].markdown
    assert "| 1, Eq. 1 (moco_queue) | 1 (1) |" in only_moco["ton2022_table"].markdown
    figure = rendered["ton2022_figure1"]
    assert "in the table only: Eq. 1 (moco_queue), ω=1." in figure.markdown
    assert not any("moco" in m for m in figure.missing)


def test_lines_without_omega_render_nothing_and_say_so(tmp_path):
    rendered = render(tmp_path, [result(split="valid")])
    assert rendered["ton2022_figure1"].files == []
    for r in rendered.values():
        assert len(r.missing) == 1 and r.missing[0].startswith("no result line with labels.omega matches")
    assert set(PARTS) <= set(RENDERERS)


# --- scripts -----------------------------------------------------------------------------------

# trains up to --max-epoch (default 1); validation perplexity by epoch from STUB_PPLS, the last repeated
# (default: 194.01 after epoch 1, 193.5, a gain < 1%, after epoch 2, and 193.6 after every later one); like
# fairseq, it rewrites checkpoint_best.pt at an epoch whose logged loss is <= the best so far
STUB_FAIRSEQ_TRAIN = """#!/usr/bin/env bash
echo "fairseq-train $*" >> "$CALLS"
epoch=1
while [ $# -gt 0 ]; do [ "$1" = --save-dir ] && dir=$2; [ "$1" = --max-epoch ] && epoch=$2; shift; done
read -r -a ppls <<< "${STUB_PPLS:-194.01 193.5 193.6}"
ppl=${ppls[$((epoch - 1))]:-${ppls[-1]}}
loss=$(awk -v p="$ppl" 'BEGIN {printf "%.3f", log(p) / log(2)}')
touch "$dir/checkpoint_last.pt"
best=$(cat "$dir/best_loss" 2>/dev/null || echo none)
if [ "$best" = none ] || awk -v l="$loss" -v b="$best" 'BEGIN {exit !(l + 0 <= b + 0)}'; then
  echo "the model of epoch $epoch" > "$dir/checkpoint_best.pt" && echo "$loss" > "$dir/best_loss"
fi
t='2024-01-01 00:00:00 | INFO'
printf "$t | train_inner | epoch %03d:    100 / 200 loss=9.1, ppl=548.2\\n" "$epoch"
printf "$t | train | epoch %03d | loss 7.438 | ppl 173.42 | wps 5000 | train_wall 60 |\\n" "$epoch"
printf "$t | valid | epoch %03d | valid on 'valid' subset | loss $loss | ppl $ppl | wps 9\\n" "$epoch"
"""

# writes the meta.json by which the scripts know a datastore, index, linked cache or retrieval is complete
STUB_KNNLM = """#!/usr/bin/env bash
echo "knnlm $*" >> "$CALLS"
arg() { local want=$1; shift; while [ $# -gt 1 ]; do [ "$1" = "$want" ] && echo "$2"; shift; done; }
case "$1 $2" in
  "prepare "*) mkdir -p "$4/$2" && touch "$4/$2/meta.json" "$4/$2/dict.txt" ;;
  "report --list") printf 'ton2022_table table T\\nxu2023_table1 table X\\nxu2023_figure5 figure F\\n' ;;
  "report "*) case " $* " in *" --best "*) echo "${STUB_BEST:-}" ;; esac ;;
  "datastore build") mkdir -p "$(arg --out "$@")/att" && touch "$(arg --out "$@")/att/meta.json" ;;
  "index build") touch "$(arg --out "$@").meta.json" ;;
  "eval link") mkdir -p "$(arg --out "$@")" && touch "$(arg --out "$@")/meta.json" ;;
  "eval retrieve")
    name=att-l2-faiss; [ -n "$(arg --index "$@")" ] || name=att-l2-real
    mkdir -p "$(arg --cache "$@")/knn/$name" && touch "$(arg --cache "$@")/knn/$name/meta.json" ;;
esac
"""

STUB_PIPELINE = """#!/usr/bin/env bash
echo "pipeline CKPT=$CKPT DATA=$DATA OUT=$OUT KEY_TYPES=$KEY_TYPES METRICS=$METRICS TPS=$TPS \
EVAL_LIMIT=${EVAL_LIMIT-unset} EXACT_LIMIT=$EXACT_LIMIT FACTORY=${FACTORY-unset} \
TEMPERATURES=${TEMPERATURES-unset} SCORE_ARGS=$SCORE_ARGS" >> "$CALLS"
mkdir -p "$OUT" && echo "{\\"run\\": \\"$OUT\\"}" > "$OUT/results.jsonl"
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def sandbox(tmp_path) -> Path:
    """A repository-shaped folder: the real scripts, a stub pipeline, and stub commands first on PATH."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("ton2022.sh", "xu2023.sh", "xu2023_replacements.sh", "lib.sh"):
        shutil.copy(SCRIPTS / name, repo / "scripts" / name)
    _executable(repo / "scripts" / "knnlm_pipeline.sh", STUB_PIPELINE)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "fairseq-train", STUB_FAIRSEQ_TRAIN)
    _executable(bin_dir / "knnlm", STUB_KNNLM)
    return repo


def run_script(repo: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    calls = repo.parent / "calls.log"
    environ = {**os.environ, "PATH": f"{repo.parent / 'bin'}:{os.environ['PATH']}", "CALLS": str(calls), **env}
    for name in {"EVAL_LIMIT", "EXACT_LIMIT", "GPUS", "EPOCHS", "FACTORY", "TEMPERATURES"} - set(env):
        environ.pop(name, None)  # the caller's settings must not leak into the checked command lines
    return subprocess.run(["bash", *args], cwd=repo.parent, env=environ, capture_output=True, text=True, timeout=60)


def calls(repo: Path) -> list[str]:
    path = repo.parent / "calls.log"
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("script", ["ton2022.sh", "xu2023.sh", "xu2023_replacements.sh", "lib.sh", "rerun_table.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(SCRIPTS / script)], check=True)


@pytest.mark.parametrize("script", ["ton2022.sh", "xu2023.sh", "xu2023_replacements.sh"])
def test_help_prints_usage_and_runs_nothing(sandbox, script):
    before = sorted(p.name for p in sandbox.parent.rglob("*"))
    proc = run_script(sandbox, f"repo/scripts/{script}", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith(f"Usage: scripts/{script} --scale small|paper")
    assert calls(sandbox) == [] and sorted(p.name for p in sandbox.parent.rglob("*")) == before
    bad = run_script(sandbox, f"repo/scripts/{script}", "--scale", "huge")
    assert bad.returncode == 2 and "--scale must be small or paper" in bad.stderr and calls(sandbox) == []
    assert run_script(sandbox, f"repo/scripts/{script}").returncode == 2


def test_ton2022_small_trains_each_omega_once_and_labels_its_results(sandbox):
    proc = run_script(sandbox, "repo/scripts/ton2022.sh", "--scale", "small", "--omegas", "0 0.1", "--seeds", "1")
    assert proc.returncode == 0, proc.stderr
    log = calls(sandbox)
    assert log[0] == "knnlm prepare wikitext-2 --dest data-bin"
    trains = [c for c in log if c.startswith("fairseq-train")]
    # one call per epoch, until three epochs in a row lower the validation perplexity by less than 1%
    # (here the second to the fourth)
    assert len(trains) == 8 and "--activation-weight 0.1 --knn-key att" in trains[4]
    assert [t.split()[-1] for t in trains] == ["1", "2", "3", "4", "1", "2", "3", "4"]
    for flag in ("--arch knnlm_transformer_lm_small", "--ddp-backend legacy_ddp", "--criterion activation_l2",
                 "--cpu --num-workers 0 --max-epoch 1"):
        assert flag in trains[0]
    assert "--patience" not in trains[0]
    assert "epoch 2: valid ppl 193.5" in proc.stdout
    pipelines = [c for c in log if c.startswith("pipeline")]
    assert pipelines[1] == (
        "pipeline CKPT=checkpoints/ton2022-small/wikitext-2/w0.1-s1/checkpoint_best.pt DATA=data-bin/wikitext-2 "
        "OUT=runs/ton2022-small/wikitext-2/w0.1-s1 KEY_TYPES=att METRICS=l2 TPS=256 EVAL_LIMIT= EXACT_LIMIT=0 "
        f"FACTORY=IVF2048,PQ32 TEMPERATURES=0.001,0.002,0.005,0.01,0.02,0.05,{TAUS} "
        "SCORE_ARGS=--label omega=0.1 --label seed=1 --label dataset=wikitext-2 "
        "--label criterion=activation_l2 --label train_ppl=173.42"
    )
    out = sandbox / "results" / "ton2022-small"
    rel = "results/ton2022-small"
    assert log[-2:] == [
        f"knnlm report {rel}/results.jsonl --out {rel} --only ton2022_table,ton2022_figure1",
        f"knnlm analyze training --log {rel}/models/wikitext-2.w0-s1.log --label ω=0 "
        f"--log {rel}/models/wikitext-2.w0.1-s1.log --label ω=0.1 --out {rel}/training",
    ]
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    # each model's end-of-epoch log lines are kept beside its result lines (four epochs: 8 lines)
    epoch_lines = (out / "models" / "wikitext-2.w0-s1.log").read_text().splitlines()
    assert len(epoch_lines) == 8 and all(" | train | " in x or " | valid | " in x for x in epoch_lines)
    # one row of training facts per finished model, kept beside its result lines
    rows = (out / "training.tsv").read_text().splitlines()
    assert rows[0].split("\t")[:4] == ["dataset", "criterion", "omega", "seed"] and len(rows) == 3
    assert sorted(p.name for p in (out / "models").glob("*.jsonl")) == ["wikitext-2.w0-s1.jsonl",
                                                                         "wikitext-2.w0.1-s1.jsonl"]
    # a second run reuses the trained models; xu2023 small reuses the ω=0 one
    assert run_script(sandbox, "repo/scripts/ton2022.sh", "--scale", "small", "--omegas", "0").returncode == 0
    assert run_script(sandbox, "repo/scripts/xu2023.sh", "--scale", "small").returncode == 0
    log = calls(sandbox)
    assert len([c for c in log if c.startswith("fairseq-train")]) == 8
    assert (
        "pipeline CKPT=checkpoints/ton2022-small/wikitext-2/w0-s1/checkpoint_best.pt DATA=data-bin/wikitext-2 "
        "OUT=runs/xu2023-small KEY_TYPES=att,ffn METRICS=l2,ip TPS=256 EVAL_LIMIT= EXACT_LIMIT=20000 "
        "FACTORY=IVF2048,PQ32 TEMPERATURES=unset SCORE_ARGS=--label dataset=wikitext-2"
    ) in log
    out = sandbox / "results" / "xu2023-small"
    assert [c for c in log if " --best " not in c][-1] == (
        "knnlm report results/xu2023-small/results.jsonl --out results/xu2023-small "
        "--only xu2023_table1,xu2023_figure5 --where labels.cache=full"
    )
    # the lines the report is rendered from are kept beside it
    assert (out / "results.jsonl").read_text() == '{"run": "runs/xu2023-small"}\n'


def test_ton2022_keeps_only_the_first_seeds_neighbours_and_skips_evaluated_models(sandbox):
    """Neighbours take GBs per model: other seeds' are deleted once their lines are kept, and not redone."""
    pipeline = sandbox / "scripts" / "knnlm_pipeline.sh"
    knn = 'for s in valid test; do mkdir -p "$OUT/cache/$s/knn/att-l2-faiss"; done\n'
    pipeline.write_text(pipeline.read_text() + knn)
    args = ("repo/scripts/ton2022.sh", "--scale", "small", "--omegas", "0", "--seeds", "1 2")
    proc = run_script(sandbox, *args)
    assert proc.returncode == 0, proc.stderr
    runs = sandbox / "runs" / "ton2022-small" / "wikitext-2"
    assert (runs / "w0-s1" / "cache" / "valid" / "knn" / "att-l2-faiss").is_dir()
    assert not (runs / "w0-s2" / "cache" / "valid" / "knn").exists()
    assert not (runs / "w0-s2" / "cache" / "test" / "knn").exists()
    assert (runs / "w0-s2" / "cache" / "valid").is_dir()  # the LM's cache stays
    assert "deleted the retrieved neighbours of w0-s2" in proc.stdout
    before = len(calls(sandbox))
    proc = run_script(sandbox, *args)
    assert proc.returncode == 0 and "w0-s2 is evaluated already" in proc.stdout
    # the first seed is evaluated again (every step is reused; the analyses need its neighbours), seed 2 is not
    assert [c.split()[3] for c in calls(sandbox)[before:] if c.startswith("pipeline")] == [
        "OUT=runs/ton2022-small/wikitext-2/w0-s1"
    ]
    proc = run_script(sandbox, *args, KEEP_NEIGHBOURS="all")
    assert proc.returncode == 0
    assert len([c for c in calls(sandbox) if "OUT=runs/ton2022-small/wikitext-2/w0-s2 " in c]) == 2
    assert (runs / "w0-s2" / "cache" / "valid" / "knn" / "att-l2-faiss").is_dir()
    bad = run_script(sandbox, *args, KEEP_NEIGHBOURS="some")
    assert bad.returncode == 2 and "KEEP_NEIGHBOURS must be first-seed or all" in bad.stderr


def test_a_model_finished_under_another_rule_trains_on_and_is_evaluated_again(sandbox):
    """A rule change reaches finished models: each trains on until the new rule stops it; one whose
    checkpoint_best.pt changed has its old lines moved to superseded/ and its stale caches deleted."""
    pipeline = sandbox / "scripts" / "knnlm_pipeline.sh"  # lines name the checkpoint they were scored with
    pipeline.write_text(pipeline.read_text() + 'sha=$(sha256sum "$CKPT" | cut -d " " -f 1)\n'
                        'echo "{\\"knobs\\": {\\"checkpoint\\": \\"$sha\\"}}" > "$OUT/results.jsonl"\n')
    args = ("repo/scripts/ton2022.sh", "--scale", "small", "--omegas", "0", "--seeds", "2")
    ppls = "194.01 193.5 193.6 150 149.9 150.5"  # best at epoch 2 under the old rule, at epoch 5 under the new one
    assert run_script(sandbox, *args, STUB_PPLS=ppls, PATIENCE="1").returncode == 0
    models = sandbox / "results/ton2022-small/models"
    old = (models / "wikitext-2.w0-s2.jsonl").read_text()
    ckpt = sandbox / "checkpoints/ton2022-small/wikitext-2/w0-s2"
    assert (ckpt / "checkpoint_best.pt").read_text() == "the model of epoch 2\n"
    stale = sandbox / "runs/ton2022-small/wikitext-2/w0-s2/stale-cache"
    stale.touch()
    proc = run_script(sandbox, *args, STUB_PPLS=ppls)
    assert proc.returncode == 0, proc.stderr
    assert "was finished under another stopping rule: training on until MIN_GAIN=0.01 PATIENCE=3" in proc.stdout
    # epochs 4 and 5, then 6 and 7 (150.5) until three epochs in a row gain less than 1%
    trains = [c for c in calls(sandbox) if c.startswith("fairseq-train")]
    assert [t.split()[-1] for t in trains] == ["1", "2", "3", "4", "5", "6", "7"]
    assert (ckpt / "checkpoint_best.pt").read_text() == "the model of epoch 5\n"
    (superseded,) = (sandbox / "results/ton2022-small/superseded").glob("wikitext-2.w0-s2.*.jsonl")
    assert superseded.read_text() == old and "changed since its results were scored" in proc.stdout
    assert not stale.exists()
    assert (models / "wikitext-2.w0-s2.jsonl").read_text() != old
    assert (models / "wikitext-2.w0-s2.tsv").read_text().split("\t")[5:7] == ["5", "149.9"]
    # a rerun under the same rule trains and supersedes nothing
    before = len(calls(sandbox))
    proc = run_script(sandbox, *args, STUB_PPLS=ppls)
    assert proc.returncode == 0 and "reusing" in proc.stdout and "changed since" not in proc.stdout
    assert not [c for c in calls(sandbox)[before:] if c.startswith("fairseq-train")]
    assert len(list((sandbox / "results/ton2022-small/superseded").iterdir())) == 3  # jsonl, tsv, log


def test_a_model_trained_on_without_a_new_best_keeps_its_lines_and_updates_its_facts(sandbox):
    args = ("repo/scripts/ton2022.sh", "--scale", "small", "--omegas", "0", "--seeds", "1 2")
    assert run_script(sandbox, *args, PATIENCE="1").returncode == 0  # 3 epochs each, the best the second
    models = sandbox / "results/ton2022-small/models"
    assert (models / "wikitext-2.w0-s2.tsv").read_text().split("\t")[4:6] == ["180", "2"]
    lines = (models / "wikitext-2.w0-s2.jsonl").read_text()
    proc = run_script(sandbox, *args)  # PATIENCE 3: a fourth epoch each, no new best
    assert proc.returncode == 0 and "w0-s2 is evaluated already" in proc.stdout
    assert (models / "wikitext-2.w0-s2.jsonl").read_text() == lines
    assert (models / "wikitext-2.w0-s2.tsv").read_text().split("\t")[4:6] == ["240", "2"]
    assert len((models / "wikitext-2.w0-s2.log").read_text().splitlines()) == 8
    assert not (sandbox / "results/ton2022-small/superseded").exists()


def test_train_only_trains_and_leaves_the_kept_lines_to_the_call_without_it(sandbox):
    """A model trained again over sittings is not scored at each cut: its old lines stay until it stops."""
    args = ("repo/scripts/ton2022.sh", "--scale", "small", "--omegas", "0", "--seeds", "1")
    kept = sandbox / "results/ton2022-small/models"
    kept.mkdir(parents=True)
    (kept / "wikitext-2.w0-s1.jsonl").write_text('{"run": "kept earlier"}\n')
    proc = run_script(sandbox, *args, "--train-only", PATIENCE="1")
    assert proc.returncode == 0, proc.stderr
    assert "nothing evaluated (--train-only)" in proc.stdout
    assert [c.split()[-1] for c in calls(sandbox) if c.startswith("fairseq-train")] == ["1", "2", "3"]
    assert not [c for c in calls(sandbox) if c.startswith(("pipeline", "knnlm report", "knnlm analyze"))]
    assert [p.name for p in kept.iterdir()] == ["wikitext-2.w0-s1.jsonl"]
    assert not (sandbox / "results/ton2022-small/report.md").exists()
    before = len(calls(sandbox))
    proc = run_script(sandbox, *args, PATIENCE="1")
    assert proc.returncode == 0, proc.stderr
    after = calls(sandbox)[before:]
    assert not [c for c in after if c.startswith("fairseq-train")]
    assert [c for c in after if c.startswith("pipeline")]
    assert "kept earlier" not in (kept / "wikitext-2.w0-s1.jsonl").read_text()
    both = run_script(sandbox, *args, "--train-only", "--report-only")
    assert both.returncode == 2 and "exclude each other" in both.stderr


def test_ton2022_report_only_renders_the_finished_models_and_runs_nothing_else(sandbox):
    proc = run_script(sandbox, "repo/scripts/ton2022.sh", "--scale", "small", "--report-only")
    assert proc.returncode == 1 and "no finished model in" in proc.stderr and calls(sandbox) == []
    assert run_script(sandbox, "repo/scripts/ton2022.sh", "--scale", "small", "--omegas", "0").returncode == 0
    before = len(calls(sandbox))
    proc = run_script(sandbox, "repo/scripts/ton2022.sh", "--scale", "small", "--report-only")
    assert proc.returncode == 0, proc.stderr
    out = sandbox / "results" / "ton2022-small"
    assert calls(sandbox)[before:] == [
        "knnlm report results/ton2022-small/results.jsonl --out results/ton2022-small "
        "--only ton2022_table,ton2022_figure1",
        "knnlm analyze training --log results/ton2022-small/models/wikitext-2.w0-s1.log --label ω=0 "
        "--out results/ton2022-small/training",
    ]
    # a model evaluated before its log lines were kept gets them on the next run
    (out / "models" / "wikitext-2.w0-s1.log").unlink()
    assert run_script(sandbox, "repo/scripts/ton2022.sh", "--scale", "small", "--omegas", "0").returncode == 0
    assert (out / "models" / "wikitext-2.w0-s1.log").stat().st_size > 0
    assert len((out / "training.tsv").read_text().splitlines()) == 2


def test_a_kept_model_without_its_training_facts_is_reported_with_a_warning(sandbox):
    # e.g. result lines copied from another machine without the .tsv written beside them
    models = sandbox / "results" / "ton2022-small" / "models"
    models.mkdir(parents=True)
    (models / "wikitext-2.w0-s1.jsonl").write_text('{"run": "kept"}\n')
    (models / "wikitext-2.w1-s1.jsonl").write_text('{"run": "kept"}\n')
    (models / "wikitext-2.w1-s1.tsv").write_text("wikitext-2\tactivation_l2\t1\t1\t60\t1\t300\t250\n")
    proc = run_script(sandbox, "repo/scripts/ton2022.sh", "--scale", "small", "--report-only")
    assert proc.returncode == 0, proc.stderr
    assert "no training facts (results/ton2022-small/models/wikitext-2.w0-s1.tsv)" in proc.stderr
    rows = (sandbox / "results" / "ton2022-small" / "training.tsv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("wikitext-2\tactivation_l2\t1\t1")


def test_ton2022_runs_the_omega_tau_question_over_the_evaluated_first_seed_models(sandbox):
    assert run_script(sandbox, "repo/scripts/ton2022.sh", "--scale", "small", "--omegas", "0 1 10").returncode == 0
    # the stub pipeline leaves no caches: nothing to analyse yet but the training curves
    assert not [c for c in calls(sandbox) if c.startswith("knnlm analyze") and "analyze training" not in c]
    runs = sandbox / "runs" / "ton2022-small" / "wikitext-2"
    for name in ("w0-s1", "w1-s1"):  # ω = 10 stays without caches (e.g. deleted to save disk)
        for split in ("valid", "test"):
            (runs / name / "cache" / split).mkdir(parents=True)
    before = len(calls(sandbox))
    proc = run_script(sandbox, "repo/scripts/ton2022.sh", "--scale", "small", "--omegas", "0 1 10", "--report-only")
    assert proc.returncode == 0, proc.stderr
    r, c = "runs/ton2022-small/wikitext-2", "checkpoints/ton2022-small/wikitext-2"
    models = " ".join(
        f"--cache {r}/{n}/cache/valid --test-cache {r}/{n}/cache/test --datastore {r}/{n}/datastore/att "
        f"--checkpoint {c}/{n}/checkpoint_best.pt --label ω={w}"
        for n, w in (("w0-s1", 0), ("w1-s1", 1))
    )
    pair = (f"--cache {r}/w0-s1/cache/valid --cache {r}/w1-s1/cache/valid --label ω=0 --label ω=1 "
            "--data-bin data-bin/wikitext-2 --lambda 0.3 --out results/ton2022-small/analyses")
    assert calls(sandbox)[before + 2 :] == [
        f"knnlm analyze temperature {models} --shared-lm-cache {r}/w0-s1/cache/valid "
        f"--shared-lm-test-cache {r}/w0-s1/cache/test --data-bin data-bin/wikitext-2 "
        "--out results/ton2022-small/temperature",
        f"knnlm analyze frequency {pair}",
        f"knnlm analyze clustering {pair}",
    ]


def test_without_the_omega_0_models_caches_an_earlier_omega_tau_analysis_is_left_as_it_is(sandbox):
    # e.g. one model of the set evaluated again on a machine that lacks the others' caches
    runs = sandbox / "runs" / "ton2022-small" / "wikitext-2"
    for split in ("valid", "test"):
        (runs / "w1-s1" / "cache" / split).mkdir(parents=True)
    models = sandbox / "results" / "ton2022-small" / "models"
    models.mkdir(parents=True)
    for name in ("w0-s1", "w1-s1"):
        (models / f"wikitext-2.{name}.jsonl").write_text('{"run": "kept"}\n')
        (models / f"wikitext-2.{name}.tsv").write_text("")
    proc = run_script(sandbox, "repo/scripts/ton2022.sh", "--scale", "small", "--omegas", "0 1", "--report-only")
    assert proc.returncode == 0, proc.stderr
    assert [c for c in calls(sandbox) if c.startswith("knnlm analyze temperature")] == []
    assert "no ω/τ analysis: w0-s1, the ω = 0 it compares with, has no kept result lines with caches" in proc.stdout


def test_ton2022_paper_uses_the_wiki103_recipe(sandbox):
    args = (
        "repo/scripts/ton2022.sh",
        "--scale",
        "paper",
        "--datasets",
        "wikitext-103",
        "--omegas",
        "1",
        "--seeds",
        "2",
    )
    assert "none was found" in run_script(sandbox, *args, GPUS="0").stderr
    proc = run_script(sandbox, *args, GPUS="2")
    assert proc.returncode == 0, proc.stderr
    (train,) = [c for c in calls(sandbox) if c.startswith("fairseq-train")]
    for flag in (
        "--arch knnlm_transformer_lm_wiki103",
        "--tokens-per-sample 3072 --max-tokens 3072 --update-freq 12",
        "--optimizer nag --lr 1.0",
        "--lr-scheduler cosine",
        "--lr-period-updates 270000 --warmup-updates 16000",
        "--max-update 286000",
        "--fp16",
        "--activation-weight 1 --knn-key att --ddp-backend legacy_ddp --seed 2",
    ):
        assert flag in train
    (pipeline,) = [c for c in calls(sandbox) if c.startswith("pipeline")]
    assert "TPS=3072 EVAL_LIMIT= EXACT_LIMIT=0 FACTORY=IVF4096,PQ64" in pipeline
    assert "--label dataset=wikitext-103" in pipeline


OUTSIDE_THE_ENVIRONMENT = {"PATH": "/usr/bin:/bin"}  # no knnlm, no fairseq-train: `make install` not on PATH
INSTALL_HINT = ("install the framework with 'make install', then put its environment on PATH "
                "('source .venv/bin/activate')")


@pytest.mark.parametrize(
    ("command", "missing"),
    [
        ([f"{SCRIPTS}/ton2022.sh", "--scale", "small"], "knnlm"),
        ([f"{SCRIPTS}/xu2023.sh", "--scale", "small"], "knnlm"),
        ([f"{SCRIPTS}/knnlm_pipeline.sh"], "knnlm"),
        (["-c", f"source {SCRIPTS}/lib.sh; train_lm small data ckpt 0 1 activation_l2"], "fairseq-train"),
    ],
)
def test_a_missing_command_is_one_error_that_says_how_to_install_it(tmp_path, command, missing):
    env = {**OUTSIDE_THE_ENVIRONMENT, "DATA": "data", "OUT": "out", "CKPT": "ckpt.pt"}
    proc = subprocess.run(["bash", *command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith(f"error: {missing}: command not found; {INSTALL_HINT}")
    assert list(tmp_path.iterdir()) == []  # nothing started


def test_train_ppl_reads_the_last_epoch_line(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        "x | INFO | train_inner | epoch 001:  100 / 200 loss=9.1, ppl=548.2\n"
        "x | INFO | train | epoch 001 | loss 7.4 | ppl 173.42 | wps 5000\n"
        "x | INFO | valid | epoch 001 | valid on 'valid' subset | loss 7.6 | ppl 194.01\n"
        "x | INFO | train | epoch 002 | loss 6.9 | ppl 119.4 | wps 5100\n"
    )
    lib = SCRIPTS / "lib.sh"
    read = f"source {lib}; train_ppl {log}; train_ppl {tmp_path / 'absent.log'}"
    proc = subprocess.run(["bash", "-c", read], capture_output=True, text=True, check=True)
    assert proc.stdout == "119.4\n"


def test_best_valid_is_the_epoch_fairseq_keeps_as_checkpoint_best(tmp_path):
    """The lowest logged loss; of equal ones the last, which fairseq's `<=` rule writes over the first."""
    log = tmp_path / "train.log"
    lines = [(1, "7.6", "194.01"), (2, "7.55", "187.44"), (3, "7.55", "187.46"), (4, "7.556", "188.16")]
    log.write_text("".join(f"x | INFO | valid | epoch {e:03d} | valid on 'valid' subset | loss {loss} | ppl {p} |\n"
                           for e, loss, p in lines))
    read = f"source {SCRIPTS / 'lib.sh'}; best_valid {log}; best_valid {tmp_path / 'absent.log'}"
    proc = subprocess.run(["bash", "-c", read], capture_output=True, text=True, check=True)
    assert proc.stdout == "3 187.46\n"


def test_json_field_reads_a_key_path_and_is_empty_when_absent(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"dump": {"limit_tokens": None, "context": {"tokens_per_sample": 256}},
                                "models": [{"tuned": {"tau": 0.0015848931924611134}}]}))
    reads = ["dump context tokens_per_sample", "dump limit_tokens", "models 0 tuned tau", "models 1 tuned",
             "dump context absent"]
    script = f"source {SCRIPTS / 'lib.sh'}; " + "; ".join(f"echo \"[$(json_field {meta} {r})]\"" for r in reads)
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True, env=with_python_on_path())
    assert proc.stdout.split() == ["[256]", "[]", "[0.0015848931924611134]", "[]", "[]"]


def test_a_retrained_seed_replaces_the_earlier_one(tmp_path):
    """Seed 1 of ω=0 retrained (new checkpoint, new numbers): the line read last counts, once."""
    rerun = result(
        {"lm_ppl": 78.0, "interp_ppl": 76.0, "lambda_used": 0.35},
        split="valid",
        checkpoint="sha256:retrained",
        index={"factory": "IVF2048,PQ32", "nprobe": 32, "path": "runs/w0-s1-retrained/index/att.l2.faiss"},
        labels={"omega": 0, "seed": 1, "train_ppl": 64.0, "dataset": "wikitext-2", "cache": "full"},
    )
    md = render(tmp_path, [*ton_lines(), rerun])["ton2022_table"].markdown
    # tuned: 76, 75 -> 75.50 ± 0.71; LM: 78, 77 -> 77.50 ± 0.71; train ppl 64, 64
    assert "| 0 | 2 (1, 2) | 64.00 ± 0.00 (n=2) | 77.50 ± 0.71 (n=2) |" in md
    assert "| 75.50 ± 0.71 (n=2) | 0.35 ± 0.00 (n=2) |" in md


def test_ton2022_small_default_set_is_the_converged_reproduction(sandbox):
    """ω ∈ {0, 1} x seeds {1, 2, 3}, then ω ∈ {0.1, 10} x seed 1, then Eq. 1 (moco_queue, ω = 1); one criterion."""
    assert run_script(sandbox, "repo/scripts/ton2022.sh", "--scale", "small").returncode == 0
    trains = [c for c in calls(sandbox) if c.startswith("fairseq-train") and c.endswith("--max-epoch 1")]
    order = [(re.search(r"--criterion (\S+)", t).group(1), re.search(r"--activation-weight (\S+)", t).group(1),
              re.search(r"--seed (\S+)", t).group(1)) for t in trains]
    assert order == [("activation_l2", "0", "1"), ("activation_l2", "1", "1"), ("activation_l2", "0", "2"),
                     ("activation_l2", "1", "2"), ("activation_l2", "0", "3"), ("activation_l2", "1", "3"),
                     ("activation_l2", "0.1", "1"), ("activation_l2", "10", "1"), ("moco_queue", "1", "1")]
    # a rerun trains nothing again
    assert run_script(sandbox, "repo/scripts/ton2022.sh", "--scale", "small").returncode == 0
    assert len([c for c in calls(sandbox) if c.startswith("fairseq-train")]) == 36  # 4 epochs each (PATIENCE 3)


def test_models_runs_only_the_named_models_of_the_set_and_reports_every_kept_one(sandbox):
    """--models finishes one model on a machine that lacks the others; a name outside the set is refused."""
    kept = sandbox / "results" / "ton2022-small" / "models"
    kept.mkdir(parents=True)
    (kept / "wikitext-2.w0-s2.jsonl").write_text('{"run": "kept earlier"}\n')
    (kept / "wikitext-2.w0-s2.tsv").write_text("wikitext-2\tactivation_l2\t0\t2\t60\t1\t194.01\t173.42\n")
    proc = run_script(sandbox, "repo/scripts/ton2022.sh", "--scale", "small", "--models", "moco-w1-s1 w0.1-s1")
    assert proc.returncode == 0, proc.stderr
    trains = {(re.search(r"--criterion (\S+)", c).group(1), re.search(r"--activation-weight (\S+)", c).group(1))
              for c in calls(sandbox) if c.startswith("fairseq-train")}
    assert trains == {("moco_queue", "1"), ("activation_l2", "0.1")}
    assert sorted(p.name for p in kept.glob("*.jsonl")) == [
        "wikitext-2.moco-w1-s1.jsonl", "wikitext-2.w0-s2.jsonl", "wikitext-2.w0.1-s1.jsonl"]
    assert "kept earlier" in (sandbox / "results" / "ton2022-small" / "results.jsonl").read_text()
    before = calls(sandbox)
    bad = run_script(sandbox, "repo/scripts/ton2022.sh", "--scale", "small", "--models", "w2-s1")
    assert bad.returncode == 2 and "'w2-s1' is not a model of this set" in bad.stderr
    assert "moco-w1-s1" in bad.stderr and calls(sandbox) == before


def valid_log(ppls: list[tuple[int, str]]) -> str:
    """fairseq-train's end-of-epoch validation lines, one per (epoch, perplexity)."""
    return "".join(f"x | INFO | valid | epoch {e:03d} | valid on 'valid' subset | loss 7 | ppl {p} | wps 1\n"
                   for e, p in ppls)


@pytest.mark.parametrize(
    ("ppls", "gain", "patience", "min_epochs", "stopped"),
    [
        ("300 200 199", "0.01", "1", "", True),  # 0.5% < 1%
        ("300 200 190", "0.01", "1", "", False),
        ("300 200 201 199", "0", "3", "", False),  # fairseq's --patience 3: two epochs without a new best
        ("300 200 201 202 200", "0", "3", "", True),
        ("300 200 199 198.5 198", "0.01", "2", "", True),  # each < 1% below the best before it
        ("300", "0.01", "1", "", False),
        ("982 991", "0.01", "1", "", True),  # ω = 10: the epoch the keys collapse in is worse than the first
        ("982 991", "0.01", "1", "3", False),  # ... which the rule does not judge before epoch 3
        ("982 991 600", "0.01", "1", "3", False),
        ("982 991 980", "0.01", "1", "3", True),
        ("300 200 199", "0.01", "1", "3", True),  # from epoch 3 on, the rule as before
    ],
)
def test_plateaued_is_the_stopping_rule(tmp_path, ppls, gain, patience, min_epochs, stopped):
    log = tmp_path / "train.log"
    # a repeated epoch (an interrupted sitting) counts once, the last
    log.write_text(valid_log([(1, "999"), *enumerate(ppls.split(), start=1)]))
    call = f"plateaued {log} {gain} {patience} {min_epochs}"
    proc = subprocess.run(["bash", "-c", f"source {SCRIPTS / 'lib.sh'}; {call}"])
    assert (proc.returncode == 0) is stopped


def test_rerun_table_sets_a_rerun_beside_its_first_run_epoch_by_epoch(tmp_path):
    def log(path: Path, ppls: dict[int, str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(valid_log(list(ppls.items())))

    results = tmp_path / "results"
    log(results / "superseded" / "wikitext-2.w0-s2.abc.log", {1: "300", 2: "200", 10: "150"})
    log(results / "models" / "wikitext-2.w0-s2.log", {1: "303", 2: "199", 3: "180"})
    script = str(SCRIPTS / "rerun_table.sh")
    env = {**os.environ, "RESULTS": str(results)}
    first = str(results / "superseded" / "wikitext-2.w0-s2.abc.log")
    proc = subprocess.run(["bash", script, "w0-s2", first, "3=190"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (results / "sensitivity" / "w0-s2-rerun.tsv").read_text() == (
        "epoch\tfirst_run_valid_ppl\trerun_valid_ppl\trelative_difference\n"
        "1\t300\t303\t+0.0100\n2\t200\t199\t-0.0050\n3\t190\t180\t-0.0526\n10\t150\t\t\n"
    )
    for args, message in ((["w0-s2", first, "3=x"], "'3=x' is not EPOCH=PPL"),
                          (["w0-s3", first], "the rerun of w0-s3 is not finished"),
                          (["w0-s2", "nowhere.log"], "FIRST_RUN_LOG nowhere.log does not exist")):
        bad = subprocess.run(["bash", script, *args], env=env, capture_output=True, text=True)
        assert bad.returncode == 2 and message in bad.stderr


def _finished_ton2022_run(repo: Path, test_limit: str = "null") -> Path:
    """What scripts/ton2022.sh leaves for the ω = 0, seed-1 model: a trained checkpoint and a finished pipeline."""
    ckpt = repo / "checkpoints/ton2022-small/wikitext-2/w0-s1"
    ckpt.mkdir(parents=True)
    (ckpt / "checkpoint_best.pt").touch()
    (ckpt / "train.done").touch()
    ton = repo / "runs/ton2022-small/wikitext-2/w0-s1"
    for folder in ("datastore/att", "index", "cache/valid", "cache/test"):
        (ton / folder).mkdir(parents=True)
    (ton / "datastore/att/meta.json").write_text("{}")
    (ton / "index/att.l2.faiss").touch()
    (ton / "index/att.l2.faiss.meta.json").write_text("{}")
    (ton / "cache/valid/meta.json").write_text('{"dump": {"limit_tokens": null}}')
    (ton / "cache/test/meta.json").write_text(f'{{"dump": {{"limit_tokens": {test_limit}}}}}')
    return ton


def test_xu2023_small_links_what_ton2022_built_and_keeps_its_own_results(sandbox):
    ton = _finished_ton2022_run(sandbox, test_limit="5000")  # a test cache of other tokens is not linked
    (sandbox / "runs/xu2023-small/index").mkdir(parents=True)
    (sandbox / "runs/xu2023-small/index/att.l2.faiss.meta.json").write_text("{}")  # an earlier run's: kept
    assert run_script(sandbox, "repo/scripts/xu2023.sh", "--scale", "small", SUBSAMPLE_RATIOS="none").returncode == 0
    run = sandbox / "runs/xu2023-small"
    for path in ("datastore/att", "index/att.l2.faiss", "cache/valid"):
        assert (run / path).is_symlink() and (run / path).resolve() == (ton / path).resolve()
        assert not Path(os.readlink(run / path)).is_absolute()
    assert not (run / "cache/test").exists() and not (run / "index/att.l2.faiss.meta.json").is_symlink()
    log = calls(sandbox)
    assert not [c for c in log if c.startswith("fairseq-train")]
    # the pipeline runs in its own folder: ton2022's results.jsonl is never written
    (pipeline,) = [c for c in log if c.startswith("pipeline")]
    assert "OUT=runs/xu2023-small KEY_TYPES=att,ffn" in pipeline and not (ton / "results.jsonl").exists()
    assert not [c for c in log if "subsample" in c]  # SUBSAMPLE_RATIOS=none
    renders = [c for c in log if " --best " not in c]
    assert renders[-1].startswith("knnlm report results/xu2023-small/results.jsonl --out results/xu2023-small")
    # a second run keeps the links as they are
    assert run_script(sandbox, "repo/scripts/xu2023.sh", "--scale", "small", SUBSAMPLE_RATIOS="none").returncode == 0
    assert (run / "datastore/att").resolve() == (ton / "datastore/att").resolve()


def test_xu2023_reports_table3_and_figures_2_4_again_at_the_tau_tuned_on_valid(sandbox):
    """τ = 1 is far too sharp for keys with ‖r‖² in the hundreds: the comparisons are redone at the tuned τ."""
    _finished_ton2022_run(sandbox)
    pipeline = sandbox / "scripts" / "knnlm_pipeline.sh"  # its lines include exact-neighbour ones
    exact_line = '{"knobs": {"labels": {"cache": "exact"}}}'
    pipeline.write_text(pipeline.read_text() + f"echo '{exact_line}' >> \"$OUT/results.jsonl\"\n")
    proc = run_script(sandbox, "repo/scripts/xu2023.sh", "--scale", "small", SUBSAMPLE_RATIOS="none", STUB_BEST="20.0")
    assert proc.returncode == 0, proc.stderr
    out = "results/xu2023-small"
    best = [c for c in calls(sandbox) if " --best " in c]
    assert best == [
        f"knnlm report {out}/results.jsonl --best temperature --where labels.cache=full --where split=test "
        "--where key_type=att --where similarity=l2 --where mask_source=faiss --where score_source=faiss "
        "--where datastore_fraction=1.0 --where lambda=tune"
    ]
    reports = [c for c in calls(sandbox) if c.startswith("knnlm report results/") and " --best " not in c]
    assert reports[-2:] == [
        f"knnlm report {out}/results.jsonl --out {out}/tuned-tau --only xu2023_table1,xu2023_figure2_4 "
        "--where labels.cache=full --where temperature=20.0",
        f"knnlm report {out}/results.jsonl --out {out}/exact/tuned-tau --only xu2023_table3,xu2023_figure2_4 "
        "--where labels.cache=exact --where temperature=20.0",
    ]
    # no tuned τ (or τ = 1 itself): nothing is rendered twice
    for best in ("", "1.0"):
        (sandbox.parent / "calls.log").unlink()
        proc = run_script(sandbox, "repo/scripts/xu2023.sh", "--scale", "small", SUBSAMPLE_RATIOS="none",
                          STUB_BEST=best)
        assert proc.returncode == 0, proc.stderr
        assert not [c for c in calls(sandbox) if "tuned-tau" in c]


def test_xu2023_evaluates_a_retrained_model_again_and_never_links_a_stale_ton2022_run(sandbox):
    ton = _finished_ton2022_run(sandbox)
    other = json.dumps({"knobs": {"checkpoint": "ab" * 32}}) + "\n"
    run = sandbox / "runs/xu2023-small"
    run.mkdir(parents=True)
    (run / "results.jsonl").write_text(other)  # scored with a checkpoint the model has since trained past
    (run / "stale-cache").touch()
    (ton / "results.jsonl").write_text(other)  # so was ton2022's run
    proc = run_script(sandbox, "repo/scripts/xu2023.sh", "--scale", "small", SUBSAMPLE_RATIOS="none")
    assert proc.returncode == 0, proc.stderr
    assert "changed since runs/xu2023-small was scored" in proc.stdout
    kept = sandbox / "results/xu2023-small/superseded/results.abababababab.jsonl"
    assert kept.read_text() == other and not (run / "stale-cache").exists()
    assert not (run / "datastore/att").is_symlink()  # built again, not linked from the stale ton2022 run
    # once ton2022's run belongs to this checkpoint again, it is linked
    sha = subprocess.run(["sha256sum", str(sandbox / "checkpoints/ton2022-small/wikitext-2/w0-s1/checkpoint_best.pt")],
                         capture_output=True, text=True).stdout.split()[0]
    (ton / "results.jsonl").write_text(json.dumps({"knobs": {"checkpoint": sha}}) + "\n")
    shutil.rmtree(run)
    assert run_script(sandbox, "repo/scripts/xu2023.sh", "--scale", "small", SUBSAMPLE_RATIOS="none").returncode == 0
    assert (run / "datastore/att").is_symlink()


def test_xu2023_rebuilds_subsampled_datastores_once(sandbox):
    _finished_ton2022_run(sandbox)
    proc = run_script(sandbox, "repo/scripts/xu2023.sh", "--scale", "small", SUBSAMPLE_RATIOS="0.1 0.5")
    assert proc.returncode == 0, proc.stderr
    log = [c for c in calls(sandbox) if "subsample" in c]
    sub = "runs/xu2023-small/subsample"
    ckpt = "checkpoints/ton2022-small/wikitext-2/w0-s1/checkpoint_best.pt"
    assert log[:4] == [
        f"knnlm datastore build --checkpoint {ckpt} --data data-bin/wikitext-2 --out {sub}/0.1/datastore --split train "
        "--key-types att --tokens-per-sample 256 --context-window 128 --max-tokens 8192 --subsample 0.1 --device auto",
        # the IVF lists scale with the datastore: IVF2048 for all training tokens, IVF256 for a tenth
        f"knnlm index build --datastore {sub}/0.1/datastore/att --out {sub}/0.1/index/att.l2.faiss "
        "--factory IVF256,PQ32 --metric l2 --train-size 200000 --nprobe 32 --device auto",
        f"knnlm eval link --cache runs/xu2023-small/cache/valid --out {sub}/0.1/cache/valid",
        f"knnlm eval retrieve --cache {sub}/0.1/cache/valid --datastore {sub}/0.1/datastore/att "
        f"--index {sub}/0.1/index/att.l2.faiss --k-max 1024 --device auto",
    ]
    # the exact-neighbour tokens (EXACT_LIMIT) get FAISS and exact neighbours from each rebuilt datastore
    assert (
        f"knnlm eval retrieve --cache {sub}/0.5/cache-exact/test --datastore {sub}/0.5/datastore/att --similarity l2 "
        "--k-max 1024 --device auto"
    ) in log
    assert "--factory IVF1024,PQ32" in log[log.index(next(c for c in log if "0.5/datastore --split" in c)) + 1]
    builds = [c for c in log if c.startswith("knnlm datastore build")]
    retrievals = [c for c in log if c.startswith("knnlm eval retrieve")]
    links = [c for c in log if c.startswith("knnlm eval link")]
    assert len(builds) == 2 and len(retrievals) == 2 * (2 + 2 * 2) and len(links) == 2 * 4
    scores = [c for c in log if c.startswith("knnlm score")]
    assert scores == [
        f"knnlm score --valid-cache {sub}/0.1/cache/valid --test-cache {sub}/0.1/cache/test --out {sub}/results.jsonl "
        f"--key-type att --similarity l2 --k 1024 --temperature {TAUS} --skip-missing --label cache=full "
        "--label dataset=wikitext-2",
        f"knnlm score --valid-cache {sub}/0.1/cache-exact/valid --test-cache {sub}/0.1/cache-exact/test "
        f"--out {sub}/results.jsonl --key-type att --similarity l2 --k 1024 --temperature {TAUS} --skip-missing "
        "--mask-source faiss,real --score-source faiss,real --label cache=exact --label dataset=wikitext-2",
        *[c for c in scores if "/0.5/" in c],
        # the score-time approximation at the same ratios, on the full caches, beside them
        "knnlm score --valid-cache runs/xu2023-small/cache/valid --test-cache runs/xu2023-small/cache/test "
        f"--out {sub}/results.jsonl --key-type att --similarity l2 --k 1024 --subsample-ratio 0.1,0.5 "
        f"--temperature {TAUS} --skip-missing --label cache=full --label dataset=wikitext-2",
    ]
    assert len(scores) == 5
    # a rerun finds every step complete (meta.json) and only scores again
    assert run_script(sandbox, "repo/scripts/xu2023.sh", "--scale", "small", SUBSAMPLE_RATIOS="0.1 0.5").returncode == 0
    again = [c for c in calls(sandbox) if "subsample" in c][len(log):]
    assert [c.split(" --")[0] for c in again] == ["knnlm score"] * 5
    bad = run_script(sandbox, "repo/scripts/xu2023.sh", "--scale", "small", SUBSAMPLE_RATIOS="0.1 1")
    assert bad.returncode == 2 and "must be in (0, 1)" in bad.stderr
    # SUBSAMPLE_CACHES=cache-exact: a new ratio is searched for the exact-neighbour tokens only
    before = len(calls(sandbox))
    ok = run_script(sandbox, "repo/scripts/xu2023.sh", "--scale", "small", SUBSAMPLE_RATIOS="0.25",
                    SUBSAMPLE_CACHES="cache-exact")
    assert ok.returncode == 0, ok.stderr
    rebuilt = ("knnlm eval", f"knnlm score --valid-cache {sub}/")
    new = [c for c in calls(sandbox)[before:] if c.startswith(rebuilt)]
    assert new and all("/0.25/cache-exact/" in c for c in new) and len(new) == 2 + 2 * 2 + 1
