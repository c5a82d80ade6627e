"""Throughput of the score phase on a synthetic cache of WikiText-103 size.

    .venv/bin/python benchmarks/bench_score.py [--valid-tokens 217646] [--test-tokens 245569] [--k 1024]
        [--workdir /tmp/knnlm-bench-score] [--keep]

Writes two caches (valid, test) with one ``att-l2-faiss`` retrieval each, streamed
to disk in chunks, then times ``score_grid`` for a τ×λ grid (τ = 0.1 … 3.0 step 0.1,
λ = tuned on validation plus six fixed values), the two passes it is made of (the
kNN log-prob grid over the memory-mapped neighbours; the λ sweep), and a
subsampled variant that also reads the neighbour ids. Results go to
``benchmarks/results/score.json`` and ``.md``. The caches are read warm (page
cache), so this measures compute, not disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from knnlm import scoring
from knnlm.evaluation.cache import Cache, RetrievalInfo, write_cache_meta
from knnlm.evaluation.score import expand_grid, score_grid

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 267_744  # WikiText-103's word vocabulary
DATASTORE = 103_225_485  # WikiText-103 training tokens
TAUS = [round(0.1 * i, 1) for i in range(1, 31)]
FIXED_LAMBDAS = [0.1, 0.2, 0.25, 0.3, 0.4, 0.5]
CHUNK = 8192


def _zipf_ids(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return np.minimum(rng.zipf(1.2, size=shape) - 1, VOCAB - 1).astype(np.int64)


def make_cache(path: Path, split: str, n_tokens: int, k: int, seed: int) -> Path:
    """Stream a synthetic cache to ``path``: sorted L2 scores, Zipfian values with target hits."""
    if (path / "meta.json").is_file():
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("n_tokens") == n_tokens and meta.get("k_max") == k:
            return path
    shutil.rmtree(path, ignore_errors=True)
    folder = path / "knn" / "att-l2-faiss"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    targets = _zipf_ids(rng, (n_tokens,))
    np.save(path / "targets.npy", targets)
    np.save(path / "lm_logprob.npy", (-rng.exponential(3.3, n_tokens)).astype(np.float32))
    open_memmap = np.lib.format.open_memmap
    ids = open_memmap(folder / "ids.npy", mode="w+", dtype=np.int64, shape=(n_tokens, k))
    scores = open_memmap(folder / "scores.npy", mode="w+", dtype=np.float32, shape=(n_tokens, k))
    vals = open_memmap(folder / "vals.npy", mode="w+", dtype=np.int64, shape=(n_tokens, k))
    for start in range(0, n_tokens, CHUNK):
        rows = slice(start, min(start + CHUNK, n_tokens))
        n = rows.stop - rows.start
        ids[rows] = rng.integers(0, DATASTORE, (n, k))
        gaps = rng.exponential(0.05, (n, k)).astype(np.float32)
        scores[rows] = -rng.uniform(20, 80, (n, 1)).astype(np.float32) - np.cumsum(gaps, axis=1)
        hit_rate = rng.beta(1.0, 3.0, (n, 1))
        chunk_vals = _zipf_ids(rng, (n, k))
        vals[rows] = np.where(rng.random((n, k)) < hit_rate, targets[rows, None], chunk_vals)
    for arr in (ids, scores, vals):
        arr.flush()
    del ids, scores, vals
    info = RetrievalInfo(
        name="att-l2-faiss",
        key_type="att",
        similarity="l2",
        mask_source="faiss",
        score_source="faiss",
        k_max=k,
        datastore={"path": "synthetic", "size": DATASTORE},
        index={"factory": "IVF4096,PQ64", "nprobe": 32},
    )
    return write_cache_meta(
        path,
        split=split,
        n_tokens=n_tokens,
        dict_size=VOCAB,
        checkpoint_fingerprint="synthetic",
        key_dims={"att": 1024, "ffn": 1024},
        retrievals=[info],
    )


def _python() -> str:
    """The interpreter as typed from the repository root (``.venv/bin/python``), else its name."""
    exe = Path(sys.executable).absolute()
    repo = Path(__file__).resolve().parents[1]
    return str(exe.relative_to(repo)) if exe.is_relative_to(repo) else exe.name


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--valid-tokens", type=int, default=217_646)
    parser.add_argument("--test-tokens", type=int, default=245_569)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/knnlm-bench-score"))
    parser.add_argument("--keep", action="store_true", help="keep the caches for the next run")
    parser.add_argument("--out", type=Path, default=RESULTS / "score")
    args = parser.parse_args(argv)

    load = os.getloadavg()[0]
    (valid_dir, gen_valid) = _timed(
        lambda: make_cache(args.workdir / "valid", "valid", args.valid_tokens, args.k, seed=1)
    )
    (test_dir, gen_test) = _timed(lambda: make_cache(args.workdir / "test", "test", args.test_tokens, args.k, 2))
    valid, test = Cache(valid_dir), Cache(test_dir)
    n_valid, n_test = valid.n_tokens, test.n_tokens
    # warm the page cache so that the timings below measure compute
    for cache in (valid, test):
        r = cache.retrieval("att-l2-faiss")
        for arr in (r.scores, r.vals):
            for start in range(0, cache.n_tokens, 65536):
                np.asarray(arr[start : start + 65536]).sum()

    settings = expand_grid(k=[args.k], temperature=TAUS, lam=["tune", *FIXED_LAMBDAS])
    lines, grid_s = _timed(lambda: list(score_grid(valid, test, settings)))
    r = test.retrieval("att-l2-faiss")
    _, knn_s = _timed(lambda: scoring.knn_logprob_grid(r.scores, r.vals, test.targets, [args.k], TAUS))
    rv = valid.retrieval("att-l2-faiss")
    valid_knn = scoring.knn_logprob(rv.scores, rv.vals, valid.targets, args.k, 1.0)
    valid_lm = np.asarray(valid.lm_logprob, dtype=np.float64)
    _, tune_s = _timed(lambda: scoring.tune_lambda(valid_lm, valid_knn))
    sub_taus = TAUS[::6]
    sub_settings = expand_grid(k=[args.k], temperature=sub_taus, subsample_ratio=[0.5])
    _, sub_s = _timed(lambda: list(score_grid(valid, test, sub_settings)))

    tokens_both = n_valid + n_test
    result = {
        "command": " ".join([_python(), "benchmarks/bench_score.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1min_at_start": round(load, 2),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "processor": platform.processor() or platform.machine(),
        },
        "cache": {
            "valid_tokens": n_valid,
            "test_tokens": n_test,
            "k": args.k,
            "dtype": "scores float32, vals int64",
            "generate_s": round(gen_valid + gen_test, 1),
        },
        "grid": {
            "temperatures": len(TAUS),
            "lambdas": ["tune (101-point grid on valid)", *FIXED_LAMBDAS],
            "settings": len(settings),
            "lines": len(lines),
            "wall_s": round(grid_s, 2),
            "settings_x_test_tokens_per_s": round(len(settings) * n_test / grid_s),
            "tau_x_tokens_per_s (both splits)": round(len(TAUS) * tokens_both / grid_s),
        },
        "knn_pass_test_split": {
            "temperatures": len(TAUS),
            "wall_s": round(knn_s, 2),
            "tau_x_tokens_per_s": round(len(TAUS) * n_test / knn_s),
            "neighbour_evals_per_s": round(len(TAUS) * n_test * args.k / knn_s),
        },
        "tune_lambda_valid": {
            "grid_points": len(scoring.DEFAULT_LAMBDA_GRID),
            "wall_s": round(tune_s, 3),
            "lambda_x_tokens_per_s": round(len(scoring.DEFAULT_LAMBDA_GRID) * n_valid / tune_s),
        },
        "subsampled_grid": {
            "subsample_ratio": 0.5,
            "temperatures": sub_taus,
            "settings": len(sub_settings),
            "wall_s": round(sub_s, 2),
            "tau_x_tokens_per_s (both splits)": round(len(sub_taus) * tokens_both / sub_s),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return result


def _markdown(r: dict) -> str:
    g, p, t, s = r["grid"], r["knn_pass_test_split"], r["tune_lambda_valid"], r["subsampled_grid"]
    c = r["cache"]
    return "\n".join(
        [
            "# Score-phase benchmark",
            "",
            f"Command: `{r['command']}`  ",
            f"Date: {r['date']}; {r['machine']['cpus']} CPUs (load {r['machine']['load_avg_1min_at_start']} at start, "
            f"shared), numpy {r['machine']['numpy']}, Python {r['machine']['python']}.",
            "",
            f"Synthetic caches: valid {c['valid_tokens']:,} + test {c['test_tokens']:,} tokens × k = {c['k']} "
            f"({c['dtype']}), memory-mapped, warm page cache.",
            "",
            "| measurement | wall (s) | throughput |",
            "|---|---:|---|",
            f"| `score_grid`: {g['settings']} settings (τ {g['temperatures']} values × λ tune + 6 fixed), both splits "
            f"| {g['wall_s']} | {g['settings_x_test_tokens_per_s']:,} settings·tokens/s "
            f"({g['tau_x_tokens_per_s (both splits)']:,} τ·tokens/s) |",
            f"| kNN log-prob grid, test split, {p['temperatures']} τ | {p['wall_s']} | {p['tau_x_tokens_per_s']:,} "
            f"τ·tokens/s ({p['neighbour_evals_per_s']:,} neighbour·τ/s) |",
            f"| `tune_lambda`, valid split, {t['grid_points']} λ | {t['wall_s']} | {t['lambda_x_tokens_per_s']:,} "
            f"λ·tokens/s |",
            f"| `score_grid` with score-time subsampling r = {s['subsample_ratio']}, {len(s['temperatures'])} τ "
            f"| {s['wall_s']} | {s['tau_x_tokens_per_s (both splits)']:,} τ·tokens/s |",
            "",
        ]
    )


if __name__ == "__main__":
    main()
