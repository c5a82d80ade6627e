"""`knnlm analyze training`: end-of-epoch numbers read from fairseq logs, curves and summary written."""

from __future__ import annotations

import csv
import json

import pytest

from knnlm.analysis.training import TrainingConfig, parse_fairseq_log, run, summarize
from knnlm.cli import main as cli_main
from knnlm.errors import KnnlmError

T = "2026-01-01 00:00:00 | INFO"


def fairseq_log(path, epochs, key_norms=None, extra=""):
    """A log as fairseq-train writes it: train_inner lines, then one valid and one train line per epoch."""
    lines = [f"{T} | fairseq_cli.train | begin training", extra]
    for i, (train_ppl, valid_ppl) in enumerate(epochs, 1):
        lines.append(f"{T} | train_inner | epoch {i:03d}:    100 / 510 loss=9.1, ppl=548.2, wps=3000")
        norm = f" | key_sq_norm {key_norms[i - 1]}" if key_norms else ""
        lines.append(f"{T} | valid | epoch {i:03d} | valid on 'valid' subset | loss {valid_ppl / 100:.4f} "
                     f"| penalty 0{norm} | ppl {valid_ppl} | wps 18000 | best_loss 7")
        lines.append(f"{T} | train | epoch {i:03d} | loss 9.689{norm} | ppl {train_ppl} | gnorm 0.7 | clip 100 "
                     f"| train_wall {100 * i} | wall 586")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_only_the_end_of_epoch_lines_count_and_a_later_epoch_line_wins(tmp_path):
    log = fairseq_log(tmp_path / "train.log", [(825.4, 311.5), (268.8, 205.9), (182.1, 210.0)], [260.5, 261.3, 264.2])
    # an epoch trained again after a restart: its later lines replace the first ones
    with log.open("a") as f:
        f.write(f"{T} | valid | epoch 003 | valid on 'valid' subset | loss 1.5 | ppl 173.2 | wps 9\n")
    records = parse_fairseq_log(log)
    assert [r.epoch for r in records] == [1, 2, 3]
    assert records[0].train == {"loss": 9.689, "key_sq_norm": 260.5, "ppl": 825.4, "gnorm": 0.7, "clip": 100.0,
                                "train_wall": 100.0, "wall": 586.0}
    assert records[2].valid == {"loss": 1.5, "ppl": 173.2, "wps": 9.0}
    assert records[1].valid["key_sq_norm"] == 261.3
    assert summarize(records) == {"epochs": 3, "best_epoch": 3, "best_valid_ppl": 173.2, "last_train_ppl": 182.1,
                                  "train_wall_seconds": 600.0}


def test_the_best_epoch_is_the_last_of_equal_logged_losses_as_fairseq_keeps_it(tmp_path):
    log = fairseq_log(tmp_path / "train.log", [(825.4, 311.5), (268.8, 205.9), (182.1, 210.0)])
    with log.open("a") as f:
        for epoch, loss, ppl in ((4, "1.55", "187.44"), (5, "1.55", "187.46"), (6, "1.556", "188.16")):
            f.write(f"{T} | valid | epoch {epoch:03d} | valid on 'valid' subset | loss {loss} | ppl {ppl} | wps 9\n")
    summary = summarize(parse_fairseq_log(log))
    assert (summary["best_epoch"], summary["best_valid_ppl"]) == (5, 187.46)


def test_run_writes_one_row_per_model_and_epoch_and_seeds_share_a_label(tmp_path):
    a = fairseq_log(tmp_path / "a.log", [(800, 300), (260, 200)], [260, 262])
    b = fairseq_log(tmp_path / "b.log", [(810, 310), (270, 205)], [259, 263])
    c = fairseq_log(tmp_path / "c.log", [(900, 960), (500, 590), (400, 470)], [117, 0.28, 0.05])
    files = run(TrainingConfig(logs=[str(a), str(b), str(c)], labels=["ω=0", "ω=0", "ω=1"], out=str(tmp_path / "o")))
    assert [f.name for f in files] == ["training.csv", "training.png", "training.json"]
    rows = list(csv.DictReader(files[0].open(encoding="utf-8")))
    assert len(rows) == 7 and rows[-1]["model"] == "ω=1" and float(rows[-1]["valid_key_sq_norm"]) == 0.05
    assert files[1].read_bytes().startswith(b"\x89PNG")
    summary = json.loads(files[2].read_text())
    assert [m["best_valid_ppl"] for m in summary["models"]] == [200, 205, 470]
    assert [m["train_wall_seconds"] for m in summary["models"]] == [300, 300, 600]
    # without key norms (a plain cross-entropy run) there is one panel, and the default label is the folder
    (tmp_path / "plain").mkdir()
    plain = fairseq_log(tmp_path / "plain" / "train.log", [(800, 300)])
    files = run(TrainingConfig(logs=[str(plain)], out=str(tmp_path / "p")))
    assert json.loads(files[2].read_text())["models"][0]["label"] == "plain"


def test_the_command_line_runs_the_same_analysis(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_main, "COMMANDS", ["analyze"])
    log = fairseq_log(tmp_path / "a.log", [(800, 300), (260, 200)], [260, 262])
    argv = ["analyze", "training", "--log", str(log), "--label", "ω=0", "--out", str(tmp_path / "o")]
    assert cli_main.main(argv) == 0
    assert json.loads((tmp_path / "o" / "training.json").read_text())["models"][0]["best_epoch"] == 2
    assert cli_main.main(["analyze", "training", "--log", str(tmp_path / "none.log"), "--out", str(tmp_path)]) == 2
    assert "none.log does not exist" in capsys.readouterr().err


def test_bad_logs_are_named(tmp_path):
    with pytest.raises(KnnlmError, match="absent.log does not exist"):
        parse_fairseq_log(tmp_path / "absent.log")
    empty = tmp_path / "empty.log"
    empty.write_text(f"{T} | train_inner | epoch 001:    100 / 510 loss=9.1\n")
    with pytest.raises(KnnlmError, match="empty.log has no end-of-epoch"):
        parse_fairseq_log(empty)
    log = fairseq_log(tmp_path / "a.log", [(800, 300)])
    with pytest.raises(KnnlmError, match="1 --label for 2 --log"):
        run(TrainingConfig(logs=[str(log), str(log)], labels=["x"], out=str(tmp_path / "o")))
    with pytest.raises(KnnlmError, match="at least one --log"):
        run(TrainingConfig(logs=[], out=str(tmp_path / "o")))
