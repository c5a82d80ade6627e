"""Search throughput and recall: IVF-PQ (two nprobe), Flat and exact top-k, and exact top-k vs a plain matmul.

    .venv/bin/python benchmarks/bench_search.py [--num-keys 300000] [--dim 256] [--queries 4096] [--k 1024]
        [--clusters 2048] [--metric l2] [--factory auto] [--train-size 65536] [--nprobe 8 32]
        [--chunk-size 262144] [--matmul-chunk 65536] [--query-batch 4096] [--reps 3] [--threads 1]
        [--workdir /tmp/knnlm-bench/search] [--out benchmarks/results/search]

Keys: a synthetic *clustered* datastore written with ``write_datastore`` (fp16
keys, memory-mapped): a mixture of ``--clusters`` Gaussian clusters with
Zipfian cluster sizes (exponent 1, like word frequencies), anisotropic
covariance (variance of the i-th principal direction ∝ 1/i, randomly rotated)
and within-cluster spread half the spread of the centres. Queries are fresh
draws from the same mixture (none of them is a key). The datastore is cached in
``--workdir``; the indexes are built afresh (training included) and timed.

Timed, in one process, in ``--reps`` interleaved repetitions (the order rotates
each repetition), each over all queries at ``k = --k``:

* ``KnnIndex.search`` of the IVF-PQ index at each ``--nprobe`` and of a Flat index;
* ``exact_topk`` for ``--metric`` (and, for the matmul comparison, for the other similarity);
* a plain ``torch.mm`` of the same shapes as exact_topk's matmuls (each query batch
  times each key chunk, keys already fp32 in memory, nothing else).

Recall@k of an index = mean over queries of |index top-k ∩ exact top-k| / k; the
IVF-PQ index is also searched once, untimed, with every list probed, for the recall
ceiling its PQ codes set. Results go to ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from common import cpu_model, spread

from knnlm.datastore import Datastore, IndexBuildConfig, KnnIndex, build_index, exact_topk, write_datastore
from knnlm.datastore.index import sidecar_path, trained_path
from knnlm.errors import KnnlmError

RESULTS = Path(__file__).resolve().parent / "results"
GENERATOR = "clustered-gaussian-v1"
KEY_SCALE = 4.0  # typical key norm ≈ 11 at D = 256
NOISE = 0.5  # within-cluster spread relative to the spread of the centres
GEN_CHUNK = 1 << 16


class Mixture:
    """The clustered key distribution: Zipfian cluster sizes, rotated anisotropic Gaussians."""

    def __init__(self, dim: int, clusters: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        spectrum = np.arange(1, dim + 1) ** -0.5
        self.basis = (spectrum[:, None] * rotation * KEY_SCALE).astype(np.float32)
        self.centers = rng.standard_normal((clusters, dim), dtype=np.float32) @ self.basis
        weights = 1.0 / np.arange(1, clusters + 1)
        self.weights = weights / weights.sum()

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` points (float32 [n, D]) and their cluster ids."""
        cluster = rng.choice(len(self.centers), size=n, p=self.weights)
        noise = rng.standard_normal((n, self.basis.shape[0]), dtype=np.float32) @ self.basis
        return self.centers[cluster] + NOISE * noise, cluster.astype(np.int32)


def make_datastore(args: argparse.Namespace) -> tuple[Datastore, np.ndarray, dict[str, Any]]:
    """The cached synthetic datastore and fresh queries from the same mixture."""
    source = {
        "generator": GENERATOR,
        "num_keys": args.num_keys,
        "dim": args.dim,
        "clusters": args.clusters,
        "zipf_exponent": 1.0,
        "noise": NOISE,
        "key_scale": KEY_SCALE,
        "seed": args.seed,
    }
    path = args.workdir / f"keys-{args.num_keys}x{args.dim}-c{args.clusters}-s{args.seed}"
    mixture = Mixture(args.dim, args.clusters, args.seed)
    queries, _ = mixture.sample(args.queries, np.random.default_rng(args.seed + 1))
    try:
        store = Datastore.open(path)
        if store.meta["source"] == source:
            return store, queries, source
    except KnnlmError:  # missing or half-written: rebuilt below
        pass
    rng = np.random.default_rng(args.seed + 2)
    keys = np.empty((args.num_keys, args.dim), dtype=np.float16)
    vals = np.empty(args.num_keys, dtype=np.int32)
    for start in range(0, args.num_keys, GEN_CHUNK):
        n = min(GEN_CHUNK, args.num_keys - start)
        keys[start : start + n], vals[start : start + n] = mixture.sample(n, rng)
    store = write_datastore(path, keys, vals, key_type="ffn", source=source, overwrite=True)
    return store, queries, source


def make_index(store: Datastore, out: Path, factory: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build an index afresh (training included) and time it; returns what its sidecar says and the time."""
    cfg = IndexBuildConfig(
        datastore=str(store.path),
        out=str(out),
        factory=factory,
        metric=args.metric,
        train_size=args.train_size,
        seed=args.seed,
        nprobe=args.nprobe[0],
        device="cpu",
    )
    for path in (out, trained_path(out)):  # no reuse of an earlier build or of its trained index
        path.unlink(missing_ok=True)
        sidecar_path(path).unlink(missing_ok=True)
    start = time.perf_counter()
    build_index(cfg)
    seconds = round(time.perf_counter() - start, 2)
    meta = json.loads(sidecar_path(out).read_text())
    return {"path": str(out), "factory": meta["factory"], "bytes": meta["index_bytes"], "build_seconds": seconds}


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of the fraction of the exact top-k ids found in the approximate top-k."""
    hits = sum(int(np.isin(e, a, assume_unique=True).sum()) for a, e in zip(approx, exact, strict=True))
    return hits / exact.size


def nearest_found(approx: np.ndarray, exact: np.ndarray) -> float:
    """Fraction of queries whose exact nearest neighbour is in the approximate top-k."""
    return float(np.mean([e[0] in a for a, e in zip(approx, exact, strict=True)]))


def matmul_baseline(queries: np.ndarray, chunks: list[torch.Tensor], query_batch: int) -> Callable[[], None]:
    """exact_topk's matmuls alone: every query batch times every (fp32, in-memory) key chunk."""
    batches = [torch.from_numpy(queries[i : i + query_batch]) for i in range(0, len(queries), query_batch)]

    def run() -> None:
        for q in batches:
            for chunk in chunks:
                torch.mm(q, chunk.T)

    return run


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall and process CPU seconds of ``fn()``, and its result."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out



def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-keys", type=int, default=300_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=4096)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--clusters", type=int, default=2048)
    parser.add_argument("--metric", choices=["l2", "ip"], default="l2")
    parser.add_argument("--factory", default="auto", help="IVF-PQ factory string (auto: knnlm's choice for N, D)")
    parser.add_argument("--train-size", type=int, default=65_536)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--chunk-size", type=int, default=262_144, help="exact_topk key chunk")
    parser.add_argument("--matmul-chunk", type=int, default=65_536, help="key chunk of the reference torch.mm")
    parser.add_argument("--query-batch", type=int, default=4096, help="exact_topk query batch")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch and faiss (OpenMP) threads")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/knnlm-bench/search"))
    parser.add_argument("--out", type=Path, default=RESULTS / "search")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    started, load = time.strftime("%Y-%m-%d %H:%M:%S %z"), os.getloadavg()[0]

    store, queries, source = make_datastore(args)
    indexes = {
        "ivfpq": make_index(store, args.workdir / f"{store.path.name}.{args.metric}.ivfpq.faiss", args.factory, args),
        "flat": make_index(store, args.workdir / f"{store.path.name}.{args.metric}.flat.faiss", "Flat", args),
    }
    ivfpq = KnnIndex.load(indexes["ivfpq"]["path"], store)
    flat = KnnIndex.load(indexes["flat"]["path"], store)
    other = "ip" if args.metric == "l2" else "l2"
    # the reference matmul streams keys in chunks of --matmul-chunk, a size at which torch.mm runs at
    # full speed (a [4,096 x 262,144] product alone would be a 4 GiB output and slow the reference down)
    chunks = [
        torch.from_numpy(np.asarray(store.keys[c : c + args.matmul_chunk], dtype=np.float32))
        for c in range(0, store.num_keys, args.matmul_chunk)
    ]

    def ivf_search(nprobe: int) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        def run() -> tuple[np.ndarray, np.ndarray]:
            ivfpq.nprobe = nprobe
            return ivfpq.search(queries, args.k)

        return run

    def exact(similarity: str) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        return lambda: exact_topk(
            queries, store, args.k, similarity, "cpu", chunk_size=args.chunk_size, query_batch=args.query_batch
        )

    methods: dict[str, Callable[[], Any]] = {f"ivfpq_nprobe{p}": ivf_search(p) for p in args.nprobe}
    methods["flat"] = lambda: flat.search(queries, args.k)
    methods[f"exact_{args.metric}"] = exact(args.metric)
    methods[f"exact_{other}"] = exact(other)
    methods["torch_mm"] = matmul_baseline(queries, chunks, args.query_batch)

    names = list(methods)
    seconds: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    outputs: dict[str, Any] = {}
    for rep in range(args.reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            wall, cpu, out = timed(methods[name])
            seconds[name]["wall"].append(wall)
            seconds[name]["cpu"].append(cpu)
            outputs.setdefault(name, out)
            print(f"rep {rep} {name}: {len(queries) / wall:,.0f} queries/s", flush=True)

    exact_ids = outputs[f"exact_{args.metric}"][1]
    throughput = {}
    for name in names:
        row: dict[str, Any] = {
            clock: {"queries_per_s": spread([len(queries) / s for s in values], 1), "seconds": spread(values, 3)}
            for clock, values in seconds[name].items()
        }
        if name.startswith("ivfpq") or name == "flat":
            row["recall_at_k"] = round(recall(outputs[name][1], exact_ids), 4)
            row["exact_nearest_in_top_k"] = round(nearest_found(outputs[name][1], exact_ids), 4)
        throughput[name] = row
    nlist = int(faiss.extract_index_ivf(ivfpq.index).nlist)
    ivfpq.nprobe = nlist  # every list: what the PQ codes alone lose (untimed)
    ceiling = {"nprobe": nlist, "recall_at_k": round(recall(ivfpq.search(queries, args.k)[1], exact_ids), 4)}
    versus_mm = {}
    for similarity in (args.metric, other):
        name = f"exact_{similarity}"
        versus_mm[similarity] = {
            clock: spread([mm / ex for ex, mm in zip(seconds[name][clock], seconds["torch_mm"][clock], strict=True)])
            for clock in ("wall", "cpu")
        }

    result = {
        "command": " ".join(["python", "benchmarks/bench_search.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": started,
        "machine": {
            "device": "cpu",
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "load_at_start": round(load, 2),
            "threads": args.threads,
            "torch": torch.__version__,
            "faiss": faiss.__version__,
            "faiss_compile_options": faiss.get_compile_options().strip(),
            "python": platform.python_version(),
        },
        "setting": {
            "keys": source,
            "key_dtype": "float16",
            "queries": args.queries,
            "k": args.k,
            "metric": args.metric,
            "train_size": args.train_size,
            "chunk_size": args.chunk_size,
            "matmul_chunk": args.matmul_chunk,
            "query_batch": args.query_batch,
            "reps": args.reps,
        },
        "indexes": indexes,
        "throughput": throughput,
        "ivfpq_all_lists": ceiling,
        "exact_over_torch_mm": versus_mm,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    """The results tables."""
    setting, machine, keys = result["setting"], result["machine"], result["setting"]["keys"]
    ivf, flat = result["indexes"]["ivfpq"], result["indexes"]["flat"]
    lines = [
        "# Search benchmark",
        "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}. Device: CPU ({machine['cpu']}), {machine['cpus']} cores shared with other jobs "
        f"(load {machine['load_at_start']} at start), {machine['threads']} torch/faiss thread(s), "
        f"torch {machine['torch']}, faiss {machine['faiss']} ({machine['faiss_compile_options']}).",
        "",
        f"Keys: N = {keys['num_keys']:,}, D = {keys['dim']}, stored fp16, synthetic clustered data "
        f"({keys['clusters']:,} Gaussian clusters with Zipfian sizes, rotated anisotropic covariance, "
        f"within-cluster spread {keys['noise']} of the centres' spread; seed {keys['seed']}). "
        f"{setting['queries']:,} queries drawn from the same mixture, k = {setting['k']}, metric {setting['metric']}. "
        f"IVF-PQ: `{ivf['factory']}` trained on {setting['train_size']:,} keys "
        f"({ivf['bytes'] / 2**20:,.1f} MiB, trained and filled in {ivf['build_seconds']} s). "
        f"Flat: `IndexFlat` over fp32 copies ({flat['bytes'] / 2**20:,.1f} MiB, built in {flat['build_seconds']} s). "
        f"exact_topk: key chunks of {setting['chunk_size']:,}, "
        f"query batches of {setting['query_batch']:,}; the reference torch.mm: key chunks of "
        f"{setting['matmul_chunk']:,}, same query batches. {setting['reps']} interleaved repetitions; medians "
        "with [min–max].",
        "",
        "| method | queries/s (wall) | queries/s (CPU) | recall@k vs exact | exact nearest in top-k |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in result["throughput"].items():
        wall, cpu = row["wall"]["queries_per_s"], row["cpu"]["queries_per_s"]
        rec = f"{row['recall_at_k']:.4f}" if "recall_at_k" in row else "—"
        top1 = f"{row['exact_nearest_in_top_k']:.4f}" if "exact_nearest_in_top_k" in row else "—"
        lines.append(
            f"| {name} | {wall['median']:,.1f} [{wall['min']:,.1f}–{wall['max']:,.1f}] | {cpu['median']:,.1f} | "
            f"{rec} | {top1} |"
        )
    ceiling = result["ivfpq_all_lists"]
    lines += [
        "",
        f"IVF-PQ with all {ceiling['nprobe']} lists probed (untimed): recall@k {ceiling['recall_at_k']:.4f}, "
        "the ceiling the PQ codes set whatever nprobe.",
        "",
        "## exact_topk vs a plain torch.mm of the same shapes (goal ≥ 0.7)",
        "",
        "Ratio = median over repetitions of (torch.mm seconds ÷ exact_topk seconds): the throughput of exact top-k "
        "as a fraction of the matmuls it is made of, with keys already fp32 in memory for the matmul "
        "(exact_topk holds a datastore's keys as fp32 in memory when that copy fits, as here; otherwise it "
        "converts fp16 chunks of the memory map).",
        "",
        "| similarity | wall | CPU |",
        "|---|---:|---:|",
    ]
    for similarity, row in result["exact_over_torch_mm"].items():
        wall, cpu = row["wall"], row["cpu"]
        lines.append(
            f"| {similarity} | **{wall['median']:.2f}** [{wall['min']:.2f}–{wall['max']:.2f}] | "
            f"{cpu['median']:.2f} [{cpu['min']:.2f}–{cpu['max']:.2f}] |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
