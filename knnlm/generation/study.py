"""Does kNN-LM decoding help open-ended generation? The two Python steps of ``scripts/generation_study.sh``.

``prompts``: fixed-length windows of the validation split — the first ``--prompt-len`` words of
evenly spaced paragraphs (lines) long enough to also hold ``--new-tokens`` more words — as a
``knnlm generate`` prompt file, and the true next words as the human reference.

``summarize``: per ``knnlm generate --out`` file (one decoding setting each) and for the
reference, the measures of :mod:`knnlm.generation.metrics`: generation speed, the base LM's
perplexity of the continuations given their prompts, distinct-n and repeated 4-grams, and the
copying of training 8-grams; one JSON line per setting and a Markdown table.

    python -m knnlm.generation.study prompts --data DATA_BIN --out DIR
    python -m knnlm.generation.study summarize --checkpoint CKPT --data DATA_BIN --out DIR SETTING.jsonl ...
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from knnlm.errors import KnnlmError
from knnlm.generation.metrics import (
    TrainingNgrams,
    bootstrap_ratio_ci,
    continuation_logprobs,
    distinct_n,
    has_repeated_ngram,
)
from knnlm.io import write_text_atomic
from knnlm.models.devices import cpu_model

logger = logging.getLogger(__name__)

COPY_N = 8  # a copied span: an n-gram this long found verbatim in the training split
REPEAT_N = 4
HUMAN = "human"


def read_lines(data: str | Path, split: str) -> tuple[list[np.ndarray], Any]:
    """The lines of a data-bin split as token-id arrays (each ending in ``</s>``), and the dictionary."""
    from fairseq.data import Dictionary, data_utils

    dictionary = Dictionary.load(str(Path(data) / "dict.txt"))
    dataset = data_utils.load_indexed_dataset(str(Path(data) / split), dictionary)
    if dataset is None:
        raise KnnlmError(f"no {split}.bin/.idx under {data}: pass the data-bin folder (knnlm prepare)")
    return [dataset[i].numpy() for i in range(len(dataset))], dictionary


def choose_windows(
    lines: Sequence[np.ndarray], eos: int, count: int, prompt_len: int, new_tokens: int
) -> list[tuple[int, list[int], list[int]]]:
    """``count`` (line index, prompt, reference) from evenly spaced lines holding ``prompt_len + new_tokens`` words.

    Each window starts a paragraph and stays inside it, so neither prompt nor reference holds
    ``</s>`` — the generated continuations, of fixed length with ``</s>`` barred, hold none either.
    """
    need = prompt_len + new_tokens
    eligible = [i for i, line in enumerate(lines) if len(line) > need and eos not in line[:need]]
    logger.info("%d of %d lines hold %d words", len(eligible), len(lines), need)
    if len(eligible) < count:
        raise KnnlmError(f"only {len(eligible)} lines hold {need} words; ask for fewer prompts or shorter windows")
    picked = [eligible[j * len(eligible) // count] for j in range(count)]
    return [(i, lines[i][:prompt_len].tolist(), lines[i][prompt_len:need].tolist()) for i in picked]


def write_prompts(args: argparse.Namespace) -> None:
    """``prompts.txt`` (one prompt of words per line) and ``references.jsonl`` (ids of prompt and human text)."""
    lines, dictionary = read_lines(args.data, args.split)
    windows = choose_windows(lines, dictionary.eos(), args.prompts, args.prompt_len, args.new_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "prompts.txt", "".join(" ".join(dictionary[t] for t in p) + "\n" for _, p, _ in windows))
    references = [{"line": i, "prompt_tokens": p, "tokens": r} for i, p, r in windows]
    write_text_atomic(out / "references.jsonl", "".join(json.dumps(r) + "\n" for r in references))
    print(f"{len(windows)} prompts of {args.split} -> {out}/prompts.txt, {out}/references.jsonl")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def decoding_of(settings: dict[str, Any]) -> str:
    """A short name of the search: ``top-p 0.9``, ``top-k 40``, ``sampling``, ``greedy`` or ``beam N``."""
    if settings.get("sampling"):
        if settings.get("sampling_topp", -1) > 0:
            return f"top-p {settings['sampling_topp']:g}"
        return f"top-k {settings['sampling_topk']}" if settings.get("sampling_topk", -1) > 0 else "sampling"
    return "greedy" if settings.get("beam", 1) == 1 else f"beam {settings['beam']}"


def measure(
    name: str,
    prompts: list[list[int]],
    continuations: list[list[int]],
    lm: Any,
    train: TrainingNgrams,
    dictionary: Any,
) -> dict[str, Any]:
    """The text measures of one set of continuations (a setting, or the human reference)."""
    logprobs = continuation_logprobs(lm, prompts, continuations, eos=dictionary.eos(), pad=dictionary.pad())
    nll = np.array([-lp.sum() for lp in logprobs])
    lengths = np.array([len(c) for c in continuations], dtype=np.float64)
    per_prompt_ppl = np.exp(nll / lengths)
    low, high = bootstrap_ratio_ci(nll, lengths)
    copies = {}
    for suffix, skip in (("", None), ("_no_unk", dictionary.unk())):
        covered = [train.covered(c, skip=skip) for c in continuations]
        copied = np.array([mask.sum() for mask in covered], dtype=np.float64)
        copies[f"copy{COPY_N}{suffix}_token_frac"] = float(copied.sum() / lengths.sum())
        copies[f"copy{COPY_N}{suffix}_token_frac_ci95"] = list(bootstrap_ratio_ci(copied, lengths))
        copies[f"copy{COPY_N}{suffix}_any_frac"] = float(np.mean([mask.any() for mask in covered]))
    return {
        "setting": name,
        "continuations": len(continuations),
        "tokens": int(lengths.sum()),
        "base_ppl": math.exp(nll.sum() / lengths.sum()),
        "base_ppl_ci95": [math.exp(low), math.exp(high)],
        "base_ppl_per_prompt_median": float(np.median(per_prompt_ppl)),
        **{f"distinct_{n}": distinct_n(continuations, n) for n in (1, 2, 3)},
        f"repeated_{REPEAT_N}gram_frac": float(np.mean([has_repeated_ngram(c, REPEAT_N) for c in continuations])),
        **copies,
        "unk_frac": float(sum(c.count(dictionary.unk()) for c in continuations) / lengths.sum()),
    }


def summarize(args: argparse.Namespace) -> None:
    """Measure every generation file and the human reference; write results.jsonl and table.md."""
    import torch

    from knnlm.models.fairseq_lm import load_language_model

    references = read_jsonl(Path(args.out) / "references.jsonl")
    lm, task = load_language_model(args.checkpoint, args.data)
    lm.eval()
    dictionary = task.source_dictionary
    train_lines, _ = read_lines(args.data, "train")
    train = TrainingNgrams.from_stream(np.concatenate(train_lines), COPY_N)
    logger.info("%d distinct training %d-grams", len(train), COPY_N)
    prompts = [r["prompt_tokens"] for r in references]
    rows = [{**measure(HUMAN, prompts, [r["tokens"] for r in references], lm, train, dictionary), "decoding": HUMAN}]
    for path in args.generations:
        records = read_jsonl(path)
        if [r["prompt_tokens"] for r in records] != prompts:
            raise KnnlmError(f"{path}: its prompts are not those of {args.out}/references.jsonl (in order)")
        settings = records[0]["settings"]
        seconds = sum(r["seconds"] for r in records)
        row = measure(Path(path).stem, prompts, [r["tokens"] for r in records], lm, train, dictionary)
        row.update(
            decoding=decoding_of(settings),
            lmbda=settings["lmbda"],
            tau=settings["knn_temp"],
            k=settings["k"],
            nprobe=settings["nprobe"],
            seed=settings["seed"],
            generation_seconds=seconds,
            tokens_per_s=row["tokens"] / seconds,
            stopped_at_eos=sum(r["stopped"] == "eos" for r in records),
        )
        rows.append(row)
    machine = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "torch_threads": torch.get_num_threads(),
    }
    out = Path(args.out)
    write_text_atomic(out / "results.jsonl", "".join(json.dumps({**row, "machine": machine}) + "\n" for row in rows))
    write_text_atomic(out / "table.md", render_table(rows, machine, len(prompts)))
    print(f"{len(rows)} rows -> {out}/results.jsonl, {out}/table.md")


def _ci(row: dict[str, Any], key: str, fmt: str) -> str:
    low, high = row[f"{key}_ci95"]
    return f"{row[key]:{fmt}} ({low:{fmt}}–{high:{fmt}})"


def _knob(row: dict[str, Any], key: str) -> str:
    if key not in row:
        return "–"
    return "any" if key == "tau" and row["lmbda"] == 0 else f"{row[key]:.4g}"


# (header, cell of a row): the columns of table.md
COLUMNS = [
    ("setting", lambda r: r["setting"]),
    ("λ", lambda r: _knob(r, "lmbda")),
    ("τ", lambda r: _knob(r, "tau")),
    ("tokens/s", lambda r: f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "–"),
    ("base-LM ppl (95% CI)", lambda r: _ci(r, "base_ppl", ".1f")),
    ("distinct-1", lambda r: f"{r['distinct_1']:.3f}"),
    ("distinct-2", lambda r: f"{r['distinct_2']:.3f}"),
    ("distinct-3", lambda r: f"{r['distinct_3']:.3f}"),
    (f"with a repeated {REPEAT_N}-gram", lambda r: f"{r[f'repeated_{REPEAT_N}gram_frac']:.1%}"),
    ("<unk>", lambda r: f"{r['unk_frac']:.1%}"),
    (f"words in a training {COPY_N}-gram (95% CI)", lambda r: _ci(r, f"copy{COPY_N}_token_frac", ".1%")),
    ("… without <unk> (95% CI)", lambda r: _ci(r, f"copy{COPY_N}_no_unk_token_frac", ".1%")),
    (f"with a training {COPY_N}-gram", lambda r: f"{r[f'copy{COPY_N}_any_frac']:.1%}"),
    ("… without <unk>", lambda r: f"{r[f'copy{COPY_N}_no_unk_any_frac']:.1%}"),
]


def render_table(rows: list[dict[str, Any]], machine: dict[str, Any], prompts: int) -> str:
    """One Markdown table per decoding, each with the human reference as its first row."""
    human = next(r for r in rows if r["setting"] == HUMAN)
    header = "| " + " | ".join(h for h, _ in COLUMNS) + " |\n" + "|---" * len(COLUMNS) + "|\n"

    def line(row: dict[str, Any]) -> str:
        return "| " + " | ".join(cell(row) for _, cell in COLUMNS) + " |\n"

    parts = [
        f"# kNN-LM generation study: {prompts} validation prompts\n\n"
        f"Machine: {machine['cpu']}, {machine['cores']} cores, OMP_NUM_THREADS={machine['omp_num_threads']} "
        f"(torch threads {machine['torch_threads']}). tokens/s: generated words over the wall clock of "
        "generation (model loading excluded; the 32 forced prompt words are searched too). CIs: percentile "
        "bootstrap over prompts (2000 resamples). λ = 0 is the base LM whatever τ (one run). "
        f'"without <unk>": {COPY_N}-grams holding <unk> not counted.\n'
    ]
    for decoding in dict.fromkeys(r["decoding"] for r in rows if r["setting"] != HUMAN):
        parts.append(f"\n## {decoding}\n\n{header}{line(human)}")
        parts.extend(line(r) for r in rows if r["decoding"] == decoding)
    return "".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m knnlm.generation.study", description=__doc__.split("\n\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)
    prompts = steps.add_parser("prompts", help="validation windows: prompts.txt and references.jsonl")
    prompts.add_argument("--data", required=True, help="fairseq data-bin folder")
    prompts.add_argument("--out", required=True, help="study folder")
    prompts.add_argument("--split", default="valid")
    prompts.add_argument("--prompts", type=int, default=200, help="number of prompts (evenly spaced lines)")
    prompts.add_argument("--prompt-len", type=int, default=32, help="words of each prompt")
    prompts.add_argument("--new-tokens", type=int, default=64, help="words of each reference continuation")
    prompts.set_defaults(func=write_prompts)
    summary = steps.add_parser("summarize", help="measure generations: results.jsonl and table.md")
    summary.add_argument("--checkpoint", required=True, help="the base LM (fairseq checkpoint)")
    summary.add_argument("--data", required=True, help="its data-bin (dict.txt, train split for the 8-grams)")
    summary.add_argument("--out", required=True, help="study folder (with references.jsonl)")
    summary.add_argument("generations", nargs="+", help="knnlm generate --out files, one per setting")
    summary.set_defaults(func=summarize)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args.func(args)
    except KnnlmError as err:
        parser.exit(1, f"error: {err}\n")


if __name__ == "__main__":
    main()
