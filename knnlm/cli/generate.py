"""``knnlm generate``: continue prompts with a fairseq LM whose next-word distribution is the kNN-LM (Eq. 5).

    knnlm generate --checkpoint CKPT --data DATA_BIN --datastore ds/att --index ds/att.l2.faiss \\
        --prompt-file prompts.txt [--lmbda 0.25 --k 1024 --knn-temp 1 --beam 4 | --sampling --sampling-topp 0.9] \\
        [--max-new-tokens 20] [--out generations.jsonl]

Without ``--out`` each prompt and its continuation are printed, tab-separated; with it one JSON
line per prompt is appended (prompt, continuation, token ids, score, settings).
"""

from __future__ import annotations

import argparse

from knnlm.cli.options import add_config_arguments, config_from_args
from knnlm.datastore.similarity import SIMILARITIES
from knnlm.generation.fairseq_lm import GenerateConfig, run_generate
from knnlm.io import append_jsonl, portable_paths
from knnlm.models.capture import KEY_TYPES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``generate`` sub-command."""
    parser = subparsers.add_parser(
        "generate",
        help="continue prompts with the kNN-LM of a fairseq checkpoint",
        description="Decode with fairseq's SequenceGenerator (greedy, beam search or sampling) from the "
        "interpolation log((1-λ)·p_LM + λ·p_kNN), searching the datastore at every step.",
    )
    add_config_arguments(
        parser,
        GenerateConfig,
        choices={"similarity": SIMILARITIES, "knn_key_type": KEY_TYPES},
        metavars={"prompt_file": "FILE", "out": "JSONL"},
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    cfg = config_from_args(GenerateConfig, args)
    records = run_generate(cfg)
    for record in records:
        if cfg.out:
            append_jsonl(cfg.out, portable_paths(record))  # committed and shared: no absolute paths
        else:
            print(f"{record['prompt']}\t{record['continuation']}")
    if cfg.out:
        print(f"wrote {len(records)} lines to {cfg.out}")
