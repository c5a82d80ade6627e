"""Training curves from fairseq logs: validation perplexity and key norm by epoch, per model.

fairseq ends every epoch with one ``| train | epoch N | loss … | ppl … | train_wall …``
line and one ``| valid | epoch N | valid on 'valid' subset | loss … | ppl …`` line;
with ``activation_l2`` or ``moco_queue`` they also carry ``key_sq_norm`` (mean ‖r‖²
of the keys) and ``penalty``. Only those end-of-epoch lines are read, so a log
filtered down to them (``grep -F -e '| train |' -e '| valid |'``, what
``scripts/ton2022.sh`` keeps beside each model's result lines) gives the same
curves as the whole log. An epoch logged twice (a retrained epoch) counts once:
the later line. Models given the same ``--label`` (the seeds of one ω) share a
colour and a legend entry.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from knnlm.errors import KnnlmError

from .outputs import write_csv, write_json
from .plots import PAIR_COLOURS, new_figure, paper_style, save_figure

logger = logging.getLogger(__name__)

NAME = "training"

_EPOCH_LINE = re.compile(r"\| (train|valid) \| epoch (\d+) \|(.*)$")
_FIELD = re.compile(r"^\s*([A-Za-z_][\w.]*) (\S+)\s*$")
#: colours beyond the four of PAIR_COLOURS (colour-blind safe, Okabe-Ito)
_MORE_COLOURS = ("#E69F00", "#56B4E9", "#F0E442", "#000000")


@dataclass(kw_only=True)
class TrainingConfig:
    """``knnlm analyze training``: the options (defaults shared with configs/analyze/training.yaml)."""

    logs: list[str]  # fairseq training logs (train.log), one per model
    out: str
    labels: list[str] | None = None  # one per log; equal labels share a colour (the seeds of one setting)


@dataclass
class EpochRecord:
    """One epoch's end-of-epoch numbers: ``train`` and ``valid`` hold fairseq's fields (floats)."""

    epoch: int
    train: dict[str, float] = field(default_factory=dict)
    valid: dict[str, float] = field(default_factory=dict)


def _fields(text: str) -> dict[str, float]:
    """``| loss 8.2 | ppl 311.5 | …`` -> numbers; fields that are not ``name number`` are skipped."""
    out: dict[str, float] = {}
    for part in text.split("|"):
        match = _FIELD.match(part)
        if match:
            try:
                out[match.group(1)] = float(match.group(2))
            except ValueError:
                continue
    return out


def parse_fairseq_log(path: str | Path) -> list[EpochRecord]:
    """The end-of-epoch train/valid numbers of one fairseq log, by epoch (a later line of an epoch wins)."""
    path = Path(path)
    if not path.is_file():
        raise KnnlmError(f"training log {path} does not exist; give the train.log of a fairseq-train run")
    epochs: dict[int, EpochRecord] = {}
    with path.open(encoding="utf-8", errors="replace") as f:
        for text in f:
            match = _EPOCH_LINE.search(text.rstrip("\n"))
            if not match:
                continue
            kind, epoch = match.group(1), int(match.group(2))
            record = epochs.setdefault(epoch, EpochRecord(epoch))
            setattr(record, kind, _fields(match.group(3)))
    if not epochs:
        raise KnnlmError(f"{path} has no end-of-epoch '| train |' or '| valid |' line; is it a fairseq-train log?")
    return [epochs[e] for e in sorted(epochs)]


def summarize(records: Sequence[EpochRecord]) -> dict[str, float | int | None]:
    """The epoch ``checkpoint_best.pt`` holds, its perplexity, epochs run and summed ``train_wall`` (seconds).

    That epoch has the lowest logged validation loss, the last of equal ones: fairseq replaces the
    best checkpoint at every loss ``<=`` the best so far.
    """
    validated = [r for r in records if "loss" in r.valid]
    best = min(reversed(validated), key=lambda r: r.valid["loss"]) if validated else None
    walls = [r.train["train_wall"] for r in records if "train_wall" in r.train]
    return {
        "epochs": len(records),
        "best_epoch": best.epoch if best else None,
        "best_valid_ppl": best.valid.get("ppl") if best else None,
        "last_train_ppl": next((r.train["ppl"] for r in reversed(records) if "ppl" in r.train), None),
        "train_wall_seconds": sum(walls) if walls else None,
    }


def _colours(labels: Sequence[str]) -> dict[str, str]:
    palette = PAIR_COLOURS + _MORE_COLOURS
    distinct = list(dict.fromkeys(labels))
    return {label: palette[i % len(palette)] for i, label in enumerate(distinct)}


def _curve(records: Sequence[EpochRecord], metric: str) -> tuple[list[int], list[float]]:
    """Epochs and values of a valid metric, where it is logged and can be drawn on a log scale."""
    points = [(r.epoch, v) for r in records if math.isfinite(v := r.valid.get(metric, math.nan)) and v > 0]
    return [e for e, _ in points], [v for _, v in points]


def plot_training(models: Sequence[tuple[str, Sequence[EpochRecord]]], path: Path) -> Path:
    """Validation perplexity by epoch and, where logged, the keys' mean ‖r‖² on valid (both log scale)."""
    with_keys = any("key_sq_norm" in r.valid for _, records in models for r in records)
    colours = _colours([label for label, _ in models])
    with paper_style():
        fig, axes = new_figure(2 if with_keys else 1)
        panels = [("ppl", "validation perplexity")] + ([("key_sq_norm", "mean ‖r‖² of the keys (valid)")] * with_keys)
        for ax, (metric, ylabel) in zip(axes, panels, strict=True):
            shown: set[str] = set()
            for label, records in models:
                epochs, values = _curve(records, metric)
                if not epochs:
                    continue
                ax.plot(epochs, values, marker="o", color=colours[label], label=None if label in shown else label)
                shown.add(label)
            ax.set_yscale("log")
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
        axes[0].legend(frameon=False)
        return save_figure(fig, path)


def run(cfg: TrainingConfig) -> list[Path]:
    """Parse every log; write ``training.csv`` (one row per model and epoch), the PNG and the JSON summary."""
    logs = list(cfg.logs or [])
    if not logs:
        raise KnnlmError("give at least one --log (a fairseq train.log)")
    labels = list(cfg.labels) if cfg.labels else [Path(log).parent.name or str(log) for log in logs]
    if len(labels) != len(logs):
        raise KnnlmError(f"{len(labels)} --label for {len(logs)} --log: give one label per log, in order")
    models = [(label, parse_fairseq_log(log)) for label, log in zip(labels, logs, strict=True)]
    out = Path(cfg.out)
    columns = ["model", "log", "epoch", "train_ppl", "train_wall", "valid_ppl", "valid_key_sq_norm", "train_gnorm"]
    rows = [
        [label, str(log), r.epoch, r.train.get("ppl"), r.train.get("train_wall"), r.valid.get("ppl"),
         r.valid.get("key_sq_norm"), r.train.get("gnorm")]
        for (label, records), log in zip(models, logs, strict=True)
        for r in records
    ]
    files = [write_csv(out / f"{NAME}.csv", columns, rows), plot_training(models, out / f"{NAME}.png")]
    summary = {
        "analysis": NAME,
        "models": [
            {"label": label, "log": str(log), **summarize(records)}
            for (label, records), log in zip(models, logs, strict=True)
        ],
    }
    files.append(write_json(out / f"{NAME}.json", summary))
    logger.info("training curves: %s", ", ".join(str(f) for f in files))
    return files
