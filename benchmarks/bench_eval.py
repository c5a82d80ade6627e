"""Evaluation throughput: the dump vs ``fairseq-eval-lm``, and the one-pass task vs the two-phase path.

    .venv/bin/python benchmarks/bench_eval.py [--reps 3] [--threads 1] [--k 1024]
        [--device cpu|cuda] [--search faiss|exact] [--datastore-keys N]
        [--workdir /tmp/knnlm-bench/eval] [--out benchmarks/results/eval]

Set-up (cached in ``--workdir``): the bundled demo corpus (``knnlm prepare demo``),
a ``knnlm_transformer_lm_tiny`` checkpoint trained for 2 updates (throughput does not
depend on training), its ``att`` datastore over the demo train split (~304K keys) and
an ``auto`` FAISS L2 index over it. Each repetition runs, in fresh processes and in a
rotating order, on the demo ``valid`` split (~32K tokens) with the same
``--tokens-per-sample 128 --context-window 64``:

* ``eval_lm``: ``fairseq_cli.eval_lm.main`` (the plain LM);
* ``dump``: ``knnlm.evaluation.dump.dump_lm`` (LM log-probs, att/ffn queries, positions);
* ``one_pass``: ``fairseq_cli.eval_lm.main`` with ``--task knnlm_language_modeling`` (k, λ=0.25);
* ``two_phase``: ``dump_lm`` + ``dump_retrieval`` (same index, k) + ``score`` of that one setting.

``--device cuda`` runs the model, exact search and re-scoring on the GPU (faiss-cpu
has no GPU search: use ``--search exact``, torch top-k on the GPU).
``--datastore-keys N`` replaces the demo datastore by one of N keys (WikiText-2 has
2,088,628): the demo keys and values tiled, with fp16 noise of 1% of their spread, so
that the search does the work of a datastore that size over keys of the model's space.

Each worker times its own call (imports excluded) and reports tokens/s; ratios are
medians over repetitions of per-repetition ratios, with min and max. The two-phase
path pays once for what every further setting reuses: its *score* time alone is
reported too (the marginal cost of one more setting).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import ratio

ROOT = Path(__file__).resolve().parents[1]
USER_DIR = ROOT / "knnlm"
TPS, CW = 128, 64
MODES = ("eval_lm", "dump", "one_pass", "two_phase")


def _eval_lm_args(work: Path, device: str, extra: list[str]) -> list[str]:
    return [
        str(work / "data-bin" / "demo"), "--user-dir", str(USER_DIR),
        "--path", str(work / "ckpt" / "checkpoint_last.pt"),
        "--gen-subset", "valid", "--tokens-per-sample", str(TPS), "--context-window", str(CW),
        "--max-tokens", "4096", "--num-workers", "0", *(["--cpu"] if device == "cpu" else []), *extra,
    ]


def _store_name(keys: int | None) -> str:
    return "att" if keys is None else f"att-{keys}"


def _run_eval_lm(args: list[str]) -> float:
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import eval_lm

    parser = options.get_eval_lm_parser()
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, args))
    t0 = time.perf_counter()
    eval_lm.main(cfg)
    return time.perf_counter() - t0


def worker(mode: str, work: Path, k: int, scratch: Path, device: str, search: str,
           keys: int | None) -> dict[str, float]:
    """One timed run of ``mode`` in this process; returns seconds (and the score-only time)."""
    import knnlm

    knnlm.register()
    from knnlm.evaluation.cache import Cache
    from knnlm.evaluation.dump import LMDumpConfig, RetrievalConfig, dump_lm, dump_retrieval
    from knnlm.evaluation.score import ScoreSetting, score

    store, index = work / "ds" / _store_name(keys), work / f"{_store_name(keys)}.l2.faiss"
    dump_cfg = LMDumpConfig(checkpoint=str(work / "ckpt" / "checkpoint_last.pt"), data=str(work / "data-bin" / "demo"),
                            out=str(scratch / "valid"), split="valid", tokens_per_sample=TPS, context_window=CW,
                            max_tokens=4096, device=device)
    if mode == "eval_lm":
        return {"seconds": _run_eval_lm(_eval_lm_args(work, device, []))}
    if mode == "one_pass":
        where = ["--indexfile", str(index)] if search == "faiss" else ["--knn-similarity", "l2"]
        knn = ["--task", "knnlm_language_modeling", "--dstore-filename", str(store), *where,
               "--k", str(k), "--lmbda", "0.25", "--knn-keytype", "att", "--knn-device", device]
        return {"seconds": _run_eval_lm(_eval_lm_args(work, device, knn))}
    t0 = time.perf_counter()
    dump_lm(dump_cfg)
    if mode == "dump":
        return {"seconds": time.perf_counter() - t0}
    where = {"index": str(index)} if search == "faiss" else {"similarity": "l2"}
    dump_retrieval(RetrievalConfig(cache=dump_cfg.out, datastore=str(store), k_max=k, device=device, **where))
    t1 = time.perf_counter()
    cache = Cache(dump_cfg.out)
    score(cache, None, ScoreSetting(key_type="att", similarity="l2", k=k, temperature=1.0, lam=0.25, split="valid"))
    t2 = time.perf_counter()
    return {"seconds": t2 - t0, "score_seconds": t2 - t1}


def setup(work: Path, search: str, keys: int | None) -> int:
    """Data, checkpoint, datastore and index, built once; returns the number of valid tokens."""
    import knnlm

    knnlm.register()
    from knnlm.data import prepare_demo
    from knnlm.datastore import DatastoreBuildConfig, IndexBuildConfig, build_datastore, build_index

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "data-bin" / "demo" / "meta.json").exists():
        prepare_demo(work / "data-bin")
    if not (work / "ckpt" / "checkpoint_last.pt").exists():
        subprocess.run(
            [sys.executable, "-m", "fairseq_cli.train", str(work / "data-bin" / "demo"), "--user-dir", str(USER_DIR),
             "--task", "language_modeling", "--arch", "knnlm_transformer_lm_tiny", "--tokens-per-sample", str(TPS),
             "--max-tokens", "2048", "--optimizer", "adam", "--lr", "0.001", "--max-update", "2",
             "--save-dir", str(work / "ckpt"), "--no-epoch-checkpoints", "--disable-validation", "--cpu",
             "--num-workers", "0"],
            check=True, capture_output=True,
        )
    build_datastore(DatastoreBuildConfig(checkpoint=str(work / "ckpt" / "checkpoint_last.pt"),
                                         data=str(work / "data-bin" / "demo"), out=str(work / "ds"),
                                         key_types=["att"], tokens_per_sample=TPS, context_window=CW, device="cpu"))
    if keys is not None:
        _synthetic_datastore(work, keys)
    name = _store_name(keys)
    if search == "faiss" and not (work / f"{name}.l2.faiss.meta.json").exists():
        build_index(IndexBuildConfig(datastore=str(work / "ds" / name), out=str(work / f"{name}.l2.faiss"),
                                     factory="auto", metric="l2", train_size=100_000, device="cpu"))
    meta = json.loads((work / "data-bin" / "demo" / "meta.json").read_text())
    return int(meta["splits"]["valid"]["tokens"])


def _synthetic_datastore(work: Path, keys: int) -> None:
    """A datastore of ``keys`` rows in the demo model's key space: demo keys tiled, plus 1% fp16 noise."""
    import numpy as np

    from knnlm.datastore import Datastore, write_datastore

    out = work / "ds" / _store_name(keys)
    if (out / "meta.json").exists():
        return
    real = Datastore.open(work / "ds" / "att")
    rows = np.arange(keys) % real.num_keys
    base = np.asarray(real.keys, dtype=np.float32)
    noise = 0.01 * float(base.std())
    rng = np.random.default_rng(0)
    tiled = np.lib.format.open_memmap(work / "synthetic-keys.npy", mode="w+", dtype=np.float16,
                                      shape=(keys, real.key_dim))
    for start in range(0, keys, 1 << 18):
        part = rows[start : start + (1 << 18)]
        tiled[start : start + len(part)] = base[part] + rng.normal(0, noise, (len(part), real.key_dim))
    write_datastore(out, tiled, np.asarray(real.vals)[rows], key_type="att",
                    source={**real.meta["source"], "synthetic": f"demo keys tiled to {keys} rows, 1% noise"})
    del tiled
    (work / "synthetic-keys.npy").unlink()


def _spawn(mode: str, args: argparse.Namespace, rep: int) -> dict[str, float]:
    scratch = Path(args.workdir) / "scratch" / f"{mode}-{rep}"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", mode, "--workdir", args.workdir, "--k", str(args.k),
         "--scratch", str(scratch), "--device", args.device, "--search", args.search,
         *(["--datastore-keys", str(args.datastore_keys)] if args.datastore_keys else [])],
        capture_output=True, text=True, env=env,
    )
    if proc.returncode != 0:
        raise SystemExit(f"worker {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--search", choices=["faiss", "exact"], default="faiss")
    parser.add_argument("--datastore-keys", type=int, help="a synthetic datastore of this many keys")
    parser.add_argument("--workdir", default="/tmp/knnlm-bench/eval")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval"))
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import shutil

        shutil.rmtree(args.scratch, ignore_errors=True)
        print(json.dumps(worker(args.worker, Path(args.workdir), args.k, Path(args.scratch), args.device, args.search,
                                args.datastore_keys)))
        return
    n_tokens = setup(Path(args.workdir), args.search, args.datastore_keys)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    score_only: list[float] = []
    for rep in range(args.reps):
        for i in range(len(MODES)):
            mode = MODES[(i + rep) % len(MODES)]
            result = _spawn(mode, args, rep)
            times[mode].append(result["seconds"])
            if "score_seconds" in result:
                score_only.append(result["score_seconds"])
    tps = {m: [n_tokens / s for s in times[m]] for m in MODES}
    results: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, "benchmarks/bench_eval.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "device": args.device,
        "search": args.search,
        "datastore_keys": args.datastore_keys,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "split_tokens": n_tokens,
        "k": args.k,
        "tokens_per_second": {m: statistics.median(v) for m, v in tps.items()},
        "dump_vs_eval_lm": ratio(tps["dump"], tps["eval_lm"]),
        "one_pass_vs_two_phase": ratio(tps["one_pass"], tps["two_phase"]),
        "one_pass_vs_eval_lm": ratio(tps["one_pass"], tps["eval_lm"]),
        "score_one_setting_seconds": statistics.median(score_only),
        "seconds": times,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    d, o = results["dump_vs_eval_lm"], results["one_pass_vs_two_phase"]
    table = [
        f"# Evaluation throughput ({results['date']}, {results['machine']}, {args.threads} thread(s), "
        f"{args.device.upper()}, {args.search} search)",
        "",
        f"`{results['command']}`: demo valid split ({n_tokens:,} tokens), tiny model, k={args.k}, "
        f"datastore of {args.datastore_keys or 'the demo train split'} keys, "
        f"{args.reps} repetitions in rotating order, fresh processes, imports excluded.",
        "",
        "| path | tokens/s (median) |",
        "|---|---:|",
        *(f"| {m} | {results['tokens_per_second'][m]:,.0f} |" for m in MODES),
        "",
        f"- dump / fairseq-eval-lm: **{d['median']:.2f}** (min {d['min']:.2f}, max {d['max']:.2f})",
        f"- one-pass task / two-phase path (dump + retrieve + score one setting): **{o['median']:.2f}** "
        f"(min {o['min']:.2f}, max {o['max']:.2f})",
        f"- one-pass task / fairseq-eval-lm: **{results['one_pass_vs_eval_lm']['median']:.2f}**",
        f"- scoring one more setting from the cache: {results['score_one_setting_seconds']:.2f} s",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(table))
    print("\n".join(table))


if __name__ == "__main__":
    main()
