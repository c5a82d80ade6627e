"""Retrieval at scale: a ≥ 20M-key memory-mapped datastore, its IVF-PQ index on disk, and the memory of
``knnlm eval retrieve`` with the index loaded vs left on disk (``--mmap``).

    .venv/bin/python benchmarks/bench_scale.py [--num-keys 20000000] [--dim 128] [--factory IVF1024,PQ16]
        [--train-size 100000] [--queries 8192] [--k 1024] [--nprobe 16] [--batch 4096] [--threads 1]
        [--workdir /tmp/knnlm-bench/scale] [--keep] [--out benchmarks/results/scale]

The keys are generated on the fly, chunk by chunk, straight into a memory-mapped
``.npy`` (the clustered mixture of ``bench_search.py``), written as a knnlm
datastore, indexed with ``build_index`` (training and adding timed), and the
whole work folder is deleted at the end (``--keep`` keeps it). The queries of a
synthetic per-token cache are then retrieved by the real command, ``knnlm eval
retrieve``, once with the index read into memory and once with ``--mmap``, each in
its own process. A watcher samples the process's ``/proc/PID/status`` every 50 ms
and records the peak of its anonymous memory (``RssAnon``: what must fit in RAM)
and of its file-backed resident pages (``RssFile``: page cache of the mapped index
and datastore, which the kernel can drop under pressure). The two retrievals must
return the same neighbours. From the measured per-key bytes the memory of a
WIKI-103-sized datastore (103,227,021 keys) is projected.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_search import Mixture
from common import cpu_model

from knnlm.datastore import IndexBuildConfig, build_index, write_datastore
from knnlm.datastore.index import sidecar_path
from knnlm.evaluation.cache import write_cache

RESULTS = Path(__file__).resolve().parent / "results"
WIKI103_KEYS = 103_227_021
GEN_CHUNK = 1 << 18
VOCAB = 50_000


def generate_keys(path: Path, n: int, dim: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray, Mixture]:
    """``n`` fp16 keys written chunk by chunk into a memory-mapped .npy, and their int32 values."""
    mixture = Mixture(dim, clusters, seed)
    keys = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    vals = np.empty(n, dtype=np.int32)
    rng = np.random.default_rng(seed + 2)
    for start in range(0, n, GEN_CHUNK):
        m = min(GEN_CHUNK, n - start)
        points, cluster = mixture.sample(m, rng)
        keys[start : start + m] = points
        vals[start : start + m] = cluster % VOCAB
    keys.flush()
    return keys, vals, mixture


class MemoryWatcher:
    """Peak ``RssAnon`` and ``RssFile`` (bytes) of a process, sampled from /proc every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name in self.peak:
                self.peak[name] = max(self.peak[name], int(value.split()[0]) * 1024)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def stop(self) -> dict[str, int]:
        self._sample()
        self._stop.set()
        self._thread.join()
        return dict(self.peak)


def retrieve(cache: Path, store: Path, index: Path, args: argparse.Namespace, mmap: bool) -> dict[str, Any]:
    """Run ``knnlm eval retrieve`` in its own process; its wall time and peak memory."""
    knnlm = Path(sys.executable).parent / "knnlm"
    cmd = [str(knnlm), "eval", "retrieve", "--cache", str(cache), "--datastore", str(store), "--index", str(index)]
    cmd += ["--k-max", str(args.k), "--nprobe", str(args.nprobe), "--batch", str(args.batch), "--device", "cpu"]
    cmd += ["--mmap"] if mmap else []
    env = {**os.environ, **{v: str(args.threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watcher = MemoryWatcher(proc.pid)
    output, _ = proc.communicate()
    peak = watcher.stop()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{output}")
    retrieval = next((cache / "knn").iterdir())
    ids = np.load(retrieval / "ids.npy")
    return {
        "command": " ".join(["knnlm", *cmd[1:]]),
        "wall_seconds": round(wall, 2),
        "queries_per_second": round(args.queries / wall, 1),
        "peak_rss_anon_bytes": peak["RssAnon"],
        "peak_rss_file_bytes": peak["RssFile"],
        "peak_rss_bytes": peak["VmHWM"],
        "ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
    }


def projection(per_key_index: float, dim: int, batch: int, k: int, centroid_bytes: int) -> dict[str, float]:
    """Bytes a WIKI-103-sized datastore needs: on disk, and resident with the index on disk."""
    return {
        "num_keys": WIKI103_KEYS,
        "keys_fp16_bytes": WIKI103_KEYS * dim * 2,
        "vals_int32_bytes": WIKI103_KEYS * 4,
        "index_bytes": WIKI103_KEYS * per_key_index,
        "resident_with_mmap_bytes": centroid_bytes + batch * k * (4 + 4 + 4),  # centroids + one batch of results
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-keys", type=int, default=20_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=2048)
    parser.add_argument("--factory", default="IVF1024,PQ16")
    parser.add_argument("--train-size", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=8192)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/knnlm-bench/scale"))
    parser.add_argument("--keep", action="store_true", help="keep the work folder (default: delete it)")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale")
    args = parser.parse_args()
    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    timings: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        raw = args.workdir / "raw_keys.npy"
        keys, vals, mixture = generate_keys(raw, args.num_keys, args.dim, args.clusters, args.seed)
        timings["generate"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        source = {"generator": "clustered-gaussian-v1", "num_keys": args.num_keys, "dim": args.dim, "seed": args.seed}
        store = write_datastore(args.workdir / "datastore", keys, vals, key_type="ffn", source=source)
        del keys
        raw.unlink()  # the datastore holds its own copy
        timings["write_datastore"] = time.perf_counter() - t0
        index = args.workdir / "index.faiss"
        cfg = IndexBuildConfig(
            datastore=str(store.path),
            out=str(index),
            factory=args.factory,
            metric="l2",
            train_size=args.train_size,
            seed=args.seed,
            nprobe=args.nprobe,
            device="cpu",
        )
        t0 = time.perf_counter()
        build_index(cfg)
        timings["index_build"] = time.perf_counter() - t0
        sidecar = json.loads(sidecar_path(index).read_text())
        queries, _ = mixture.sample(args.queries, np.random.default_rng(args.seed + 1))
        targets = np.random.default_rng(args.seed + 3).integers(0, VOCAB, size=args.queries)
        runs = {}
        for mode in ("loaded", "mmap"):
            cache = args.workdir / f"cache-{mode}"
            write_cache(
                cache,
                split="valid",
                targets=targets,
                lm_logprob=np.full(args.queries, -5.0),
                dict_size=VOCAB,
                checkpoint_fingerprint="sha256:synthetic",
                key_dims={"ffn": args.dim},
                query_ffn=queries,
            )
            runs[mode] = retrieve(cache, store.path, index, args, mmap=mode == "mmap")
        same = runs["loaded"].pop("ids_sha256") == runs["mmap"].pop("ids_sha256")
        disk = {
            "keys_bytes": (store.path / "keys.npy").stat().st_size,
            "vals_bytes": (store.path / "vals.npy").stat().st_size,
            "index_bytes": index.stat().st_size,
        }
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    per_key = disk["index_bytes"] / args.num_keys
    result = {
        "command": "python benchmarks/bench_scale.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "device": f"CPU ({cpu_model()}), {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f} at the end",
        "threads": args.threads,
        "faiss": faiss.__version__,
        "setting": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "index": {"factory": sidecar["factory"], "ntotal": args.num_keys},
        "disk": disk,
        "timings_seconds": {k: round(v, 1) for k, v in timings.items()},
        "retrieve": runs,
        "same_neighbours_mmap_and_loaded": same,
        "wiki103_projection": projection(per_key, 1024, args.batch, args.k, 4096 * 1024 * 4),  # IVF4096 centroids
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(result))
    print(render(result))


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def render(r: dict[str, Any]) -> str:
    s, disk, runs, proj = r["setting"], r["disk"], r["retrieve"], r["wiki103_projection"]
    lines = [
        "# Retrieval at scale",
        "",
        f"Command: `{r['command']}`  ",
        f"Date: {r['date']}. Device: {r['device']}, {r['threads']} thread(s), faiss {r['faiss']}.",
        "",
        f"Datastore: {s['num_keys']:,} synthetic keys × D = {s['dim']} (fp16, memory-mapped): keys "
        f"{_gib(disk['keys_bytes'])}, values {_gib(disk['vals_bytes'])}; index `{r['index']['factory']}` "
        f"{_gib(disk['index_bytes'])} ({disk['index_bytes'] / s['num_keys']:.1f} bytes per key). "
        f"Generated in {r['timings_seconds']['generate']:.0f} s, written as a datastore in "
        f"{r['timings_seconds']['write_datastore']:.0f} s, index trained on {s['train_size']:,} keys and filled in "
        f"{r['timings_seconds']['index_build']:.0f} s; the work folder was deleted afterwards.",
        "",
        f"`knnlm eval retrieve` of {s['queries']:,} queries, k = {s['k']}, nprobe {s['nprobe']}, batches of "
        f"{s['batch']:,}, each in its own process; peaks sampled from /proc every 50 ms:",
        "",
        "| index | wall | queries/s | peak anonymous memory | peak file-backed resident | peak RSS |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode, run in runs.items():
        lines.append(
            f"| {'in memory' if mode == 'loaded' else 'on disk (`--mmap`)'} | {run['wall_seconds']:.1f} s | "
            f"{run['queries_per_second']:,.0f} | {_gib(run['peak_rss_anon_bytes'])} | "
            f"{_gib(run['peak_rss_file_bytes'])} | {_gib(run['peak_rss_bytes'])} |"
        )
    lines += [
        "",
        f"Same neighbours with the index on disk and in memory: **{r['same_neighbours_mmap_and_loaded']}**.",
        "Anonymous memory is what must fit in RAM; file-backed pages (the mapped index lists and datastore "
        "values that were read) are page cache the kernel drops under memory pressure.",
        "",
        f"WIKI-103 projection ({proj['num_keys']:,} keys, D = 1024, this index's "
        f"{disk['index_bytes'] / s['num_keys']:.1f} bytes per key): keys {_gib(proj['keys_fp16_bytes'])} and "
        f"values {_gib(proj['vals_int32_bytes'])} on disk, "
        f"index {_gib(proj['index_bytes'])} (at PQ64 with 8-byte ids: 72 bytes per key, "
        f"{_gib(72 * proj['num_keys'])}); with `--mmap` the resident minimum is the `IVF4096` centroids plus one "
        f"batch of results, {_gib(proj['resident_with_mmap_bytes'])}, besides the interpreter and its libraries.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
