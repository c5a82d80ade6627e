"""Datastore build throughput vs plain ``fairseq-eval-lm``, and peak memory at two datastore sizes.

    .venv/bin/python benchmarks/bench_datastore.py [--layers 3] [--dim 256]
        [--tokens-per-sample 512] [--context-window 256] [--max-tokens 4096] [--repeat 2]
        [--workdir /tmp/knnlm-bench-datastore]

On the bundled demo corpus (WikiText-2 slice, ~300k train tokens) with a
one-update checkpoint of ``knnlm_transformer_lm_tiny`` widened to ``--layers``
× ``--dim`` (FFN 4×dim, full softmax with tied embeddings; throughput does not
depend on training),
both sides run on the same checkpoint, split, windows (fairseq 0.12 eval_lm
``--tokens-per-sample``/``--context-window``) and batch size, alternately,
``--repeat`` times each, in fresh processes; the best run of each counts.

* eval_lm: its own "Evaluated N tokens in Xs (Y tokens/s)" line — model forward
  and log-softmax only, data loading and start-up excluded.
* datastore build: wall time of ``build_datastore`` (``att`` and ``ffn`` in one
  pass) — loading, hashing, forward, writing, fsync included.
* memory: peak RSS of the build process for a quarter of the split (shard 0 of
  4) and for all of it, with the size of the keys written.

Results go to ``benchmarks/results/datastore.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CORPUS = ROOT / "knnlm" / "resources" / "demo_corpus"

BUILD_SNIPPET = """
import json, resource, sys, time
from knnlm.datastore import DatastoreBuildConfig, build_datastore
cfg = DatastoreBuildConfig(**json.loads(sys.argv[1]))
start = time.perf_counter()
paths = build_datastore(cfg)
seconds = time.perf_counter() - start
keys = sum((p / "keys.npy").stat().st_size for p in paths)
rows = json.load(open(paths[0] / "meta.json"))["num_keys"]
print("RESULT " + json.dumps({"seconds": seconds, "rows": rows, "keys_bytes": keys,
                              "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def prepare(work: Path, layers: int, dim: int, tokens_per_sample: int) -> tuple[Path, Path]:
    """Binarize the demo corpus and train the model for one update (cached in ``work``)."""
    data, ckpt_dir = work / "data-bin", work / f"ckpt-{layers}x{dim}-{tokens_per_sample}"
    if not (data / "train.bin").exists():
        text = work / "text"
        text.mkdir(parents=True, exist_ok=True)
        for split in ("train", "valid", "test"):
            with gzip.open(CORPUS / f"wiki.{split}.tokens.gz", "rt", encoding="utf-8") as f:
                (text / f"wiki.{split}.tokens").write_text(f.read(), encoding="utf-8")
        shutil.rmtree(data, ignore_errors=True)
        run([sys.executable, "-m", "fairseq_cli.preprocess", "--only-source", "--workers", "2",
             "--trainpref", str(text / "wiki.train.tokens"), "--validpref", str(text / "wiki.valid.tokens"),
             "--testpref", str(text / "wiki.test.tokens"), "--destdir", str(data)])
    ckpt = ckpt_dir / "checkpoint_last.pt"
    if not ckpt.exists():
        run([sys.executable, "-m", "fairseq_cli.train", str(data), "--user-dir", str(ROOT / "knnlm"),
             "--task", "language_modeling", "--arch", "knnlm_transformer_lm_tiny",
             "--decoder-layers", str(layers), "--decoder-embed-dim", str(dim),
             "--decoder-ffn-embed-dim", str(4 * dim), "--tokens-per-sample", str(tokens_per_sample),
             "--max-tokens", str(tokens_per_sample * 2), "--optimizer", "adam", "--lr", "0.0005",
             "--max-update", "1", "--save-dir", str(ckpt_dir), "--no-epoch-checkpoints",
             "--no-progress-bar", "--seed", "1", "--cpu", "--num-workers", "0"])
    return data, ckpt


def eval_lm(data: Path, ckpt: Path, args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    proc = run([sys.executable, "-m", "fairseq_cli.eval_lm", str(data), "--path", str(ckpt),
                "--user-dir", str(ROOT / "knnlm"), "--gen-subset", "train",
                "--tokens-per-sample", str(args.tokens_per_sample), "--context-window", str(args.context_window),
                "--max-tokens", str(args.max_tokens), "--cpu", "--num-workers", "0", "--no-progress-bar"])
    wall = time.perf_counter() - start
    found = re.search(r"Evaluated ([\d,]+) tokens in ([\d.]+)s \(([\d.]+) tokens/s\)", proc.stdout + proc.stderr)
    if not found:
        sys.exit(f"eval_lm printed no throughput line:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    tokens = int(found.group(1).replace(",", ""))
    return {"tokens": tokens, "forward_seconds": float(found.group(2)), "tokens_per_s": float(found.group(3)),
            "process_wall_seconds": wall}


def build(data: Path, ckpt: Path, out: Path, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    cfg = {"checkpoint": str(ckpt), "data": str(data), "out": str(out), "tokens_per_sample": args.tokens_per_sample,
           "context_window": args.context_window, "max_tokens": args.max_tokens, "device": "cpu", **extra}
    proc = run([sys.executable, "-c", BUILD_SNIPPET, json.dumps(cfg)])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result["tokens_per_s"] = result["rows"] / result["seconds"]
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--tokens-per-sample", type=int, default=512)
    parser.add_argument("--context-window", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/knnlm-bench-datastore"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    data, ckpt = prepare(args.workdir, args.layers, args.dim, args.tokens_per_sample)
    load = os.getloadavg()[0]

    evals, builds = [], []
    for _ in range(args.repeat):
        evals.append(eval_lm(data, ckpt, args))
        builds.append(build(data, ckpt, args.workdir / "ds", args))
    best_eval = max(evals, key=lambda r: r["tokens_per_s"])
    best_build = max(builds, key=lambda r: r["tokens_per_s"])
    quarter = build(data, ckpt, args.workdir / "ds-quarter", args, num_shards=4, shard_id=0)
    ratio = best_build["tokens_per_s"] / best_eval["tokens_per_s"]
    rss_growth = builds[-1]["max_rss_kb"] / quarter["max_rss_kb"]

    result = {
        "command": "python benchmarks/bench_datastore.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {"cpus": os.cpu_count(), "load_at_start": load, "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "setting": {"model": f"knnlm_transformer_lm_tiny, {args.layers} layers x {args.dim}, full softmax",
                    "tokens_per_sample": args.tokens_per_sample,
                    "context_window": args.context_window, "max_tokens": args.max_tokens, "split": "train",
                    "key_types": ["att", "ffn"]},
        "eval_lm_runs": evals,
        "build_runs": builds,
        "build_over_eval_lm": ratio,
        "memory": {"quarter": quarter, "full": builds[-1], "rss_full_over_quarter": rss_growth},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "datastore.json").write_text(json.dumps(result, indent=2) + "\n")
    mib = 1 / 1024
    lines = [
        "# Datastore build benchmark",
        "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}; {os.cpu_count()} CPUs (load {load:.2f} at start, shared), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), CPU only.",
        "",
        f"Checkpoint: {result['setting']['model']} (1 update), demo corpus train split "
        f"({best_eval['tokens']:,} tokens); "
        f"windows of {args.tokens_per_sample} tokens with {args.context_window} of carried context, "
        f"--max-tokens {args.max_tokens}. Best of {args.repeat} alternating runs.",
        "",
        "| measurement | tokens/s | seconds |",
        "|---|---:|---:|",
        f"| `fairseq-eval-lm` (its own forward-only timer) | {best_eval['tokens_per_s']:,.0f} | "
        f"{best_eval['forward_seconds']:.2f} (process {best_eval['process_wall_seconds']:.2f}) |",
        f"| `knnlm datastore build`, att+ffn, end to end | {best_build['tokens_per_s']:,.0f} | "
        f"{best_build['seconds']:.2f} |",
        f"| **ratio build / eval_lm** (goal ≥ 0.8) | **{ratio:.2f}** | |",
        "",
        "| build size | keys written | peak RSS |",
        "|---|---:|---:|",
        f"| quarter split ({quarter['rows']:,} tokens) | {quarter['keys_bytes'] * mib * mib:,.1f} MiB | "
        f"{quarter['max_rss_kb'] * mib:,.1f} MiB |",
        f"| full split ({builds[-1]['rows']:,} tokens) | {builds[-1]['keys_bytes'] * mib * mib:,.1f} MiB | "
        f"{builds[-1]['max_rss_kb'] * mib:,.1f} MiB |",
        f"| **peak RSS full / quarter** | {builds[-1]['keys_bytes'] / quarter['keys_bytes']:.2f}× keys | "
        f"**{rss_growth:.2f}×** |",
        "",
    ]
    (RESULTS / "datastore.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
