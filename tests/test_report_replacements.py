"""Report parts of the datastore replacements: kNN and component lines in one table, figures over n and k."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from knnlm.report import parse_line, render_report

from .test_report import PNG_MAGIC, result

ROOT = Path(__file__).resolve().parents[1]


def component(metrics: dict, **knobs) -> dict:
    base = {"split": "test", "component": "x", "kind": "learned", "key_type": "att", "n": 1.0, "sizes": "uniform",
            "init": "lm", "loss": "ce", "updates": 100, "lambda": "tune",
            "lambda_grid": {"min": 0.0, "max": 1.0, "n": 101}, "checkpoint": "sha256:m", "labels": {}}
    base.update(knobs)
    values = {"n_tokens": 100, "lm_ppl": 21.75, "component_ppl": 25.0, "component_zero_mass": 0,
              "interp_ppl": 20.0, "interp_zero_mass": 0, "oracle_ppl": 15.0, "lambda_used": 0.3}
    values.update(metrics)
    return {"schema": "knnlm.component/1", "knobs": base, "metrics": values, "provenance": {}}


def lines() -> list:
    records = [
        result({"knn_ppl": "inf", "knn_zero_mass": 7, "interp_ppl": 19.17}),
        component({"component_ppl": 22.58, "interp_ppl": 20.35}, component="learned-att-n1"),
        component({"interp_ppl": 20.1}, component="learned-att-n2", n=2.0),
        component({"interp_ppl": 19.9}, component="learned-att-n3", n=3.0),
        component({"interp_ppl": 21.4}, component="learned-ffn-n1", key_type="ffn"),
        component({"interp_ppl": 20.9}, component="learned-att-n1-interp", loss="interpolated", loss_lambda=0.25),
        component({"interp_ppl": 19.95}, component="adaptive", n=3.0, sizes="frequency"),
    ]
    for k, ppl in ((1, 21.7), (16, 21.5), (1024, 21.6)):
        for t in (1.0, 2.0):
            records.append(component({"interp_ppl": ppl - t / 10}, kind="topk", k=k, temperature=t,
                                     component=f"topk-k{k}-t{t}"))
    return [parse_line(r, f"mem:{i}") for i, r in enumerate(records)]


def test_table2_mixes_knn_and_learned_rows_and_flags_the_missing(tmp_path):
    (t2,) = render_report(lines(), tmp_path, names=["xu2023_table2"])
    rows = {line.split("|")[1].strip() + "/" + line.split("|")[2].strip() + "/" + line.split("|")[3].strip(): line
            for line in t2.markdown.splitlines() if line.startswith("| ") and "---" not in line}
    assert "| 21.75 |" in rows["Base LM/–/–"]
    assert "∞ (7/100 tokens at zero mass)" in rows["kNN-LM/att/datastore"] and "19.17" in rows["kNN-LM/att/datastore"]
    assert "22.58" in rows["learned W_ds/att/V"] and "20.35" in rows["learned W_ds/att/V"]
    assert "19.90" in rows["learned W_ds/att/3V"]
    assert "20.90" not in t2.markdown, "the interpolated-loss head is not a cross-entropy row"
    assert any("ffn / 3V" in m for m in t2.missing) and any("kNN-LM / ffn" in m for m in t2.missing)


def test_figures_3_and_8_are_drawn_from_component_lines(tmp_path):
    out = render_report(lines(), tmp_path, names=["xu2023_figure3", "xu2023_figure8", "xu2023_table6",
                                                  "xu2023_table8"])
    fig3, fig8, t6, t8 = out
    for fig in (fig3, fig8):
        png = [f for f in fig.files if f.suffix == ".png"]
        assert png and png[0].read_bytes()[:8] == PNG_MAGIC
    assert "19.95" in t6.markdown and "19.90" in t6.markdown  # frequency-sized and uniform rows at 3V
    assert "20.90" in t8.markdown and "20.35" in t8.markdown


# --- scripts/xu2023_replacements.sh, with stub commands ------------------------------------------

# a head whose validation loss is lowest at update 500 and equal (as logged) at 750, which fairseq then keeps
# as checkpoint_best.pt, but counts as no gain: with 1000 and 1250, three validations without one, early stop
STUB_HEAD_TRAIN = """#!/usr/bin/env bash
echo "fairseq-train $*" >> "$CALLS"
while [ $# -gt 0 ]; do [ "$1" = --save-dir ] && dir=$2; shift; done
touch "$dir/checkpoint_best.pt" "$dir/checkpoint_last.pt"
t='2024-01-01 00:00:00 | INFO'
for row in "1 250 6.0 64" "1 500 5.5 45.25" "1 750 5.5 45.26" "2 1000 5.7 52" "2 1250 5.8 55.7"; do
  set -- $row
  printf "$t | valid | epoch %03d | valid on 'valid' subset | loss $3 | nll_loss $3 | ppl $4 | num_updates $2\\n" "$1"
done
echo "$t | fairseq_cli.train | early stop since valid performance hasn't improved for last 3 runs"
"""

STUB_KNNLM = """#!/usr/bin/env bash
echo "knnlm $*" >> "$CALLS"
arg() { local want=$1; shift; while [ $# -gt 1 ]; do [ "$1" = "$want" ] && echo "$2"; shift; done; }
case "$1 $2" in
  "eval component") mkdir -p "$(arg --cache "$@")/components/$(arg --name "$@")"
                    touch "$(arg --cache "$@")/components/$(arg --name "$@")/meta.json" ;;
  "score "*) echo '{}' > "$(arg --out "$@")" ;;
  "report --list") echo "xu2023_table2 table T" ;;
esac
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def test_small_scale_trains_each_head_until_its_validation_loss_stops_improving(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("xu2023_replacements.sh", "lib.sh"):
        shutil.copy(ROOT / "scripts" / name, repo / "scripts" / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "fairseq-train", STUB_HEAD_TRAIN)
    _executable(bin_dir / "knnlm", STUB_KNNLM)
    pipeline = tmp_path / "pipeline"
    meta = json.dumps({"dump": {"context": {"tokens_per_sample": 256}}})
    for split in ("valid", "test"):
        (pipeline / "cache" / split).mkdir(parents=True)
        (pipeline / "cache" / split / "meta.json").write_text(meta)
    (pipeline / "results.jsonl").write_text("")
    (tmp_path / "base.pt").touch()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls.log"),
           "EXPERIMENTS": "learned", "KEYS": "att", "NS": "1 3"}
    for name in ("VALID_UPDATES", "HEAD_PATIENCE", "MAX_UPDATES", "MAX_TOKENS", "LR"):
        env.pop(name, None)
    args = ["bash", str(repo / "scripts" / "xu2023_replacements.sh"), "--scale", "small", "--pipeline", str(pipeline),
            "--checkpoint", str(tmp_path / "base.pt"), "--data", str(tmp_path), "--out", str(tmp_path / "out")]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "calls.log").read_text().splitlines()
    trains = [c for c in log if c.startswith("fairseq-train")]
    assert len(trains) == 2 and "--ds-key att --ds-n 3" in trains[1]
    for flag in ("--max-tokens 2048 --validate-interval-updates 250 --save-interval-updates 250 "
                 "--keep-interval-updates 1 --patience 3 --max-update 4000 --cpu", "--lr 0.003"):
        assert flag in trains[0]
    assert "--disable-validation" not in trains[0]
    heads = repo / "runs" / "xu2023-replacements-small" / "heads"
    assert f"knnlm eval component --cache {pipeline}/cache/valid --name learned-att-n3 --checkpoint " \
           f"{heads}/att-n3/checkpoint_best.pt --data {tmp_path}" in log
    assert "trained 1250 updates (2 epochs); best valid ppl 45.26 at update 750; stopped by patience" in proc.stdout
    assert (tmp_path / "out" / "heads.tsv").read_text().splitlines() == [
        "head\tupdates\tepochs\tbest_update\tbest_valid_ppl\tstopped_by",
        "att-n1\t1250\t2\t750\t45.26\tpatience",
        "att-n3\t1250\t2\t750\t45.26\tpatience",
    ]
    # a rerun trains nothing and adds no component again
    assert subprocess.run(args, env=env, capture_output=True, text=True, timeout=60).returncode == 0
    again = (tmp_path / "calls.log").read_text().splitlines()[len(log):]
    assert not [c for c in again if c.startswith(("fairseq-train", "knnlm eval"))]
