"""Evaluation at WikiText-2 scale: a real adaptive-softmax model and a 2.09M-key datastore.

    .venv/bin/python benchmarks/bench_wikitext2.py --checkpoint CKPT --data data-bin/wikitext-2
        [--valid-text ../shared/data/wikitext-2/wiki.valid.tokens] [--lines 1000] [--k 1024]
        [--factory IVF4096,PQ32] [--nprobe 32] [--reps 2] [--threads 2]
        [--workdir /tmp/knnlm-bench/wikitext2] [--out benchmarks/results/wikitext2]

The bench of the paths users wait on, on what they run them with: ``CKPT`` is a
``knnlm_transformer_lm_small`` WikiText-2 checkpoint (3 layers, 256-d, adaptive softmax
over 33,280 words; throughput does not depend on how long it was trained), the
datastore holds the ``att`` keys of all 2,088,628 training tokens, the index is
``--factory`` (trained on 200K keys) searched at ``--nprobe``, and the queries are the
first ``--lines`` lines of the valid split (binarized with the data-bin's dictionary;
the split's first 1,000 lines hold ~55K tokens), windows of 256 tokens carrying 128
of context. Datastore, index, and the inputs of the retrieval modes are built once
and cached in ``--workdir``.

Each repetition runs every mode once, in fresh processes, in a rotating order, each
timing its own work (imports excluded):

* ``eval_lm``: ``fairseq_cli.eval_lm.main``, the plain LM;
* ``datastore``: ``build_datastore`` of the same split (att and ffn keys);
* ``dump``: ``dump_lm`` (LM log-probs, att/ffn queries, positions);
* ``retrieve``: ``dump_retrieval`` of a dumped cache with the index (k neighbours);
* ``faiss_loop``: ``faiss.read_index`` + ``index.search`` over the same queries in
  batches of 4,096, nothing else (the floor of ``retrieve``);
* ``rescore``: "real score" of those neighbours: open the datastore, read its keys
  into memory (they fit), ``rescore`` every query's k ids;
* ``one_pass``: ``fairseq_cli.eval_lm.main`` with ``--task knnlm_language_modeling``
  (same index, k, λ = 0.25);
* ``two_phase``: ``dump_lm`` + ``dump_retrieval`` + ``score`` of one setting.

Ratios are medians over repetitions of per-repetition ratios (min–max beside).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import ratio

ROOT = Path(__file__).resolve().parents[1]
USER_DIR = ROOT / "knnlm"
TPS, CW = 256, 128
MODES = ("eval_lm", "datastore", "dump", "retrieve", "faiss_loop", "rescore", "one_pass", "two_phase")
SEARCH_BATCH = 4096


def _paths(work: Path) -> dict[str, Path]:
    return {
        "data": work / "data-bin",
        "datastore": work / "train-ds" / "att",
        "index": work / "train.att.l2.faiss",
        "cache": work / "cache-valid",
        "ckpt": work / "checkpoint.pt",
    }


def _eval_lm(work: Path, extra: list[str]) -> float:
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import eval_lm

    p = _paths(work)
    args = [str(p["data"]), "--user-dir", str(USER_DIR), "--path", str(p["ckpt"]), "--gen-subset", "valid",
            "--tokens-per-sample", str(TPS), "--context-window", str(CW), "--max-tokens", "4096", "--cpu",
            "--num-workers", "0", *extra]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_eval_lm_parser(), args))
    t0 = time.perf_counter()
    eval_lm.main(cfg)
    return time.perf_counter() - t0


def _fresh_cache(work: Path, scratch: Path) -> Path:
    """A copy of the dumped valid cache without retrievals (retrieve writes into it)."""
    dst = scratch / "cache"
    shutil.copytree(_paths(work)["cache"], dst, ignore=shutil.ignore_patterns("knn"))
    return dst


def worker(mode: str, work: Path, k: int, nprobe: int, scratch: Path) -> dict[str, float]:
    """One timed run of ``mode`` in this process; returns its seconds."""
    import knnlm

    knnlm.register()
    import faiss
    import numpy as np

    from knnlm.datastore import Datastore, DatastoreBuildConfig, build_datastore, rescore
    from knnlm.evaluation.cache import Cache
    from knnlm.evaluation.dump import LMDumpConfig, RetrievalConfig, dump_lm, dump_retrieval
    from knnlm.evaluation.score import ScoreSetting, score

    p = _paths(work)
    dump_cfg = LMDumpConfig(checkpoint=str(p["ckpt"]), data=str(p["data"]), out=str(scratch / "dumped"),
                            split="valid", tokens_per_sample=TPS, context_window=CW, max_tokens=8192, device="cpu")
    retrieval = {"datastore": str(p["datastore"]), "index": str(p["index"]), "k_max": k, "nprobe": nprobe,
                 "device": "cpu"}
    if mode == "eval_lm":
        return {"seconds": _eval_lm(work, [])}
    if mode == "one_pass":
        return {"seconds": _eval_lm(work, [
            "--task", "knnlm_language_modeling", "--dstore-filename", str(p["datastore"]), "--indexfile",
            str(p["index"]), "--k", str(k), "--probe", str(nprobe), "--lmbda", "0.25", "--knn-keytype", "att"])}
    if mode == "datastore":
        t0 = time.perf_counter()
        build_datastore(DatastoreBuildConfig(checkpoint=str(p["ckpt"]), data=str(p["data"]), out=str(scratch / "ds"),
                                             split="valid", tokens_per_sample=TPS, context_window=CW, device="cpu"))
        return {"seconds": time.perf_counter() - t0}
    if mode == "dump":
        t0 = time.perf_counter()
        dump_lm(dump_cfg)
        return {"seconds": time.perf_counter() - t0}
    if mode == "retrieve":
        cache = _fresh_cache(work, scratch)
        t0 = time.perf_counter()
        dump_retrieval(RetrievalConfig(cache=str(cache), **retrieval))
        return {"seconds": time.perf_counter() - t0}
    if mode == "faiss_loop":
        queries = np.load(p["cache"] / "query_att.npy", mmap_mode="r")
        t0 = time.perf_counter()
        index = faiss.read_index(str(p["index"]))
        faiss.extract_index_ivf(index).nprobe = nprobe
        for q0 in range(0, len(queries), SEARCH_BATCH):
            index.search(np.ascontiguousarray(queries[q0 : q0 + SEARCH_BATCH], dtype=np.float32), k)
        return {"seconds": time.perf_counter() - t0}
    if mode == "rescore":
        queries = np.load(p["cache"] / "query_att.npy", mmap_mode="r")
        ids = np.load(p["cache"] / "knn" / "att-l2-faiss" / "ids.npy", mmap_mode="r")
        t0 = time.perf_counter()
        store = Datastore.open(p["datastore"])
        store.load_keys_if_they_fit()
        for q0 in range(0, len(queries), SEARCH_BATCH):
            rescore(np.asarray(queries[q0 : q0 + SEARCH_BATCH], dtype=np.float32), ids[q0 : q0 + SEARCH_BATCH],
                    store, "l2", device="cpu")
        return {"seconds": time.perf_counter() - t0}
    assert mode == "two_phase"
    t0 = time.perf_counter()
    dump_lm(dump_cfg)
    dump_retrieval(RetrievalConfig(cache=dump_cfg.out, **retrieval))
    score(Cache(dump_cfg.out), None,
          ScoreSetting(key_type="att", similarity="l2", k=k, temperature=1.0, lam=0.25, split="valid"))
    return {"seconds": time.perf_counter() - t0}


def setup(args: argparse.Namespace) -> int:
    """Subset data-bin, datastore and index of the train split, a dumped and retrieved cache; returns tokens."""
    import knnlm

    knnlm.register()
    from knnlm.datastore import DatastoreBuildConfig, IndexBuildConfig, build_datastore, build_index
    from knnlm.evaluation.dump import LMDumpConfig, RetrievalConfig, dump_lm, dump_retrieval

    work = Path(args.workdir)
    p = _paths(work)
    work.mkdir(parents=True, exist_ok=True)
    if not p["ckpt"].exists():
        shutil.copyfile(args.checkpoint, p["ckpt"])
    data = Path(args.data)
    if not (p["data"] / "valid.bin").exists():
        lines = Path(args.valid_text).read_text(encoding="utf-8").splitlines(keepends=True)[: args.lines]
        subset = work / "valid-subset.tokens"
        subset.write_text("".join(lines), encoding="utf-8")
        subprocess.run([sys.executable, "-m", "fairseq_cli.preprocess", "--only-source", "--srcdict",
                        str(data / "dict.txt"), "--validpref", str(subset), "--destdir", str(p["data"]),
                        "--workers", "1"], check=True, capture_output=True)
        for name in ("train.bin", "train.idx"):  # the datastore's split, shared with the full data-bin
            (p["data"] / name).unlink(missing_ok=True)
            (p["data"] / name).symlink_to((data / name).resolve())
    if not (p["datastore"] / "meta.json").exists():
        build_datastore(DatastoreBuildConfig(checkpoint=str(p["ckpt"]), data=str(p["data"]),
                                             out=str(work / "train-ds"), split="train", key_types=["att"],
                                             tokens_per_sample=TPS, context_window=CW, device="cpu"))
    if not Path(str(p["index"]) + ".meta.json").exists():
        build_index(IndexBuildConfig(datastore=str(p["datastore"]), out=str(p["index"]), factory=args.factory,
                                     metric="l2", train_size=200_000, nprobe=args.nprobe, device="cpu"))
    dump_lm(LMDumpConfig(checkpoint=str(p["ckpt"]), data=str(p["data"]), out=str(p["cache"]), split="valid",
                         tokens_per_sample=TPS, context_window=CW, device="cpu"))
    if not (p["cache"] / "knn" / "att-l2-faiss" / "meta.json").exists():
        dump_retrieval(RetrievalConfig(cache=str(p["cache"]), datastore=str(p["datastore"]), index=str(p["index"]),
                                       k_max=args.k, nprobe=args.nprobe, device="cpu"))
    return int(json.loads((p["cache"] / "meta.json").read_text())["n_tokens"])


def _spawn(mode: str, args: argparse.Namespace, rep: int) -> float:
    scratch = Path(args.workdir) / "scratch" / f"{mode}-{rep}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    threads = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads)
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", mode, "--workdir", args.workdir, "--k", str(args.k),
         "--nprobe", str(args.nprobe), "--scratch", str(scratch)],
        capture_output=True, text=True, env=env,
    )
    shutil.rmtree(scratch, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {mode} failed:\n{proc.stderr[-3000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["seconds"])



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--data", default="data-bin/wikitext-2")
    parser.add_argument("--valid-text", default=str(ROOT.parent / "shared/data/wikitext-2/wiki.valid.tokens"))
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--factory", default="IVF4096,PQ32")
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/knnlm-bench/wikitext2")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "wikitext2"))
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.workdir), args.k, args.nprobe, Path(args.scratch))))
        return
    if not args.checkpoint and not (Path(args.workdir) / "checkpoint.pt").exists():
        parser.error("--checkpoint is required the first time (a WikiText-2 knnlm_transformer_lm_small checkpoint)")
    n_tokens = setup(args)
    seconds: dict[str, list[float]] = {m: [] for m in MODES}
    for rep in range(args.reps):
        for i in range(len(MODES)):
            mode = MODES[(i + rep) % len(MODES)]
            seconds[mode].append(_spawn(mode, args, rep))
            print(f"rep {rep} {mode}: {seconds[mode][-1]:.1f} s", flush=True)
    speed = {m: [n_tokens / s for s in v] for m, v in seconds.items()}
    results: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, "benchmarks/bench_wikitext2.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "device": "cpu",
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "valid_tokens": n_tokens,
        "datastore_keys": 2_088_628,
        "k": args.k,
        "factory": args.factory,
        "nprobe": args.nprobe,
        "tokens_per_second": {m: round(statistics.median(v)) for m, v in speed.items()},
        "ratios": {
            "dump / eval_lm (speed)": ratio(speed["dump"], speed["eval_lm"], 3),
            "datastore build / eval_lm (speed)": ratio(speed["datastore"], speed["eval_lm"], 3),
            "retrieve / plain faiss loop (speed)": ratio(speed["retrieve"], speed["faiss_loop"], 3),
            "real-score re-scoring / faiss search (time)": ratio(seconds["rescore"], seconds["faiss_loop"], 3),
            "one-pass / two-phase (speed)": ratio(speed["one_pass"], speed["two_phase"], 3),
            "one-pass / eval_lm (speed)": ratio(speed["one_pass"], speed["eval_lm"], 3),
        },
        "seconds": seconds,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    table = [
        f"# Evaluation at WikiText-2 scale ({results['date']}, {results['machine']}, {args.threads} thread(s), CPU)",
        "",
        f"`{results['command']}`: knnlm_transformer_lm_small (adaptive softmax, 33,280 words), the first "
        f"{n_tokens:,} valid tokens, windows {TPS}/{CW}, an {args.factory} index (nprobe {args.nprobe}) over the "
        f"2,088,628 train keys, k = {args.k}; {args.reps} repetitions in rotating order, fresh processes, "
        "imports excluded.",
        "",
        "| path | tokens/s (median) |",
        "|---|---:|",
        *(f"| {m} | {results['tokens_per_second'][m]:,} |" for m in MODES),
        "",
        "| ratio | median | min | max |",
        "|---|---:|---:|---:|",
        *(f"| {name} | **{r['median']:.2f}** | {r['min']:.2f} | {r['max']:.2f} |"
          for name, r in results["ratios"].items()),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(table))
    print("\n".join(table))


if __name__ == "__main__":
    main()
