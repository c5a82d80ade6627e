"""Datastore build throughput vs plain ``fairseq-eval-lm``, and peak memory of builds of two sizes.

    .venv/bin/python benchmarks/bench_datastore.py [--arch knnlm_transformer_lm_small]
        [--criterion adaptive_loss] [--updates 2]
        [--split valid] [--tokens-per-sample 512] [--context-window 256] [--max-tokens 4096]
        [--reps 5] [--threads 1] [--memory-shards 10 2] [--workdir /tmp/knnlm-bench/datastore]
        [--out benchmarks/results/datastore]

Set-up (cached in ``--workdir``): the bundled demo corpus prepared as ``knnlm
prepare demo`` does, and a checkpoint of ``--arch`` trained for ``--updates``
updates with ``fairseq-train`` (throughput does not depend on training).

Throughput: on the same checkpoint, split (the demo ``valid`` split, ~32K tokens),
``--tokens-per-sample``/``--context-window`` and batches, ``--reps`` repetitions
each run ``fairseq_cli.eval_lm``, ``build_datastore`` (``att`` and ``ffn`` keys in
one pass) and a bare forward pass once, in fresh processes, in an order that
rotates. The bare forward pass (``decoder.extract_features`` over the same
windows, no output layer, nothing kept) is the floor of the build's work. fairseq's
``--max-tokens`` counts the *new* targets of a window (its block of
``tokens_per_sample − context_window``), the build's counts whole windows, so the
build gets ``windows × tokens_per_sample`` to run the same windows per batch.
Two scopes are timed (imports and argument parsing excluded from both):

* end to end: ``eval_lm.main(cfg)`` vs ``build_datastore(cfg)`` — model and data
  loading, forward, and (build) hashing, writing, fsync; for the bare forward
  pass, model loading, batch making and the forward calls;
* loop: eval_lm's own "Evaluated N tokens in Xs" timer (scorer calls only, its
  batch collation excluded) vs the build's ``_run`` (batch assembly, forward,
  key gathering, writes, fsync) vs the forward calls alone.

Ratios are medians over repetitions of (build tokens/s) / (eval_lm tokens/s), or
/ (forward tokens/s), of the same repetition, with their min and max, for wall
time and process CPU time.

Memory: peak RSS (``ru_maxrss``) of one build process per size, builds of shard 0
of ``--memory-shards`` shards of the train split (~30K and ~150K tokens by default),
next to the RSS the process had after its imports.

Results go to ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import cpu_model, spread

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
USER_DIR = ROOT / "knnlm"

# Run in a fresh interpreter: argv[1] is a JSON request, the last stdout line "RESULT {json}" the answer.
_PRELUDE = """
import json, logging, resource, sys, time
import torch
request = json.loads(sys.argv[1])
torch.set_num_threads(request["threads"])
"""

EVAL_LM_SNIPPET = (
    _PRELUDE
    + """
import re
import knnlm  # the --user-dir, registered before the timer as fairseq would skip it then
knnlm.register()
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq_cli import eval_lm

messages = []
class Keep(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())
logging.getLogger("fairseq_cli.eval_lm").addHandler(Keep())
args = options.parse_args_and_arch(options.get_eval_lm_parser(), input_args=request["argv"])
cfg = convert_namespace_to_omegaconf(args)
wall, cpu = time.perf_counter(), time.process_time()
eval_lm.main(cfg)
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
line = next(m for m in messages if m.startswith("Evaluated "))
found = re.match(r"Evaluated ([\\d,]+) tokens in ([\\d.]+)s", line)
print("RESULT " + json.dumps({"wall": wall, "cpu": cpu, "tokens": int(found.group(1).replace(",", "")),
                              "loop_wall": float(found.group(2)), "threads": torch.get_num_threads()}))
"""
)

BUILD_SNIPPET = (
    _PRELUDE
    + """
import knnlm.datastore.build as build
from knnlm.datastore import DatastoreBuildConfig, Datastore

loop = {}
inner = build._run
def timed_run(*a, **kw):
    wall, cpu = time.perf_counter(), time.process_time()
    inner(*a, **kw)
    loop["wall"], loop["cpu"] = time.perf_counter() - wall, time.process_time() - cpu
build._run = timed_run
rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cfg = DatastoreBuildConfig(**request["config"])
wall, cpu = time.perf_counter(), time.process_time()
paths = build.build_datastore(cfg)
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
stores = [Datastore.open(p) for p in paths]
print("RESULT " + json.dumps({
    "wall": wall, "cpu": cpu, "loop_wall": loop["wall"], "loop_cpu": loop["cpu"],
    "tokens": stores[0].num_keys, "keys_bytes": sum(int(s.keys.nbytes + s.vals.nbytes) for s in stores),
    "windows_per_batch": stores[0].meta["compute"]["windows_per_batch"],
    "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "rss_after_imports_kib": rss_imports,
    "threads": torch.get_num_threads()}))
"""
)


FORWARD_SNIPPET = (
    _PRELUDE
    + """
import numpy as np
from knnlm.datastore.build import load_language_model, load_split
from knnlm.models.windows import ContextPlan

c = request["config"]
wall, cpu = time.perf_counter(), time.process_time()
model, task = load_language_model(c["checkpoint"], c["data"])
model.eval()
stream, _ = load_split(c["data"], c["split"], task.source_dictionary)
plan = ContextPlan(len(stream), c["tokens_per_sample"], c["context_window"], c["max_tokens"])
batches = []
for b in range(plan.num_batches):
    windows = [plan.window(w) for w in plan.batch_windows(b)]
    tokens = np.full((len(windows), max(e - a for a, _, e in windows)), task.source_dictionary.pad())
    for i, (a, _, e) in enumerate(windows):
        tokens[i, : e - a] = stream.sources(a, e)
    batches.append(torch.from_numpy(tokens))
setup_wall, setup_cpu = time.perf_counter() - wall, time.process_time() - cpu
wall, cpu = time.perf_counter(), time.process_time()
with torch.inference_mode():
    for tokens in batches:
        model.decoder.extract_features(tokens, None)
loop_wall, loop_cpu = time.perf_counter() - wall, time.process_time() - cpu
print("RESULT " + json.dumps({"wall": setup_wall + loop_wall, "cpu": setup_cpu + loop_cpu, "loop_wall": loop_wall,
                              "tokens": len(stream), "threads": torch.get_num_threads()}))
"""
)


def child_env(threads: int) -> dict[str, str]:
    """The environment of every child process: the same thread count for OpenMP and MKL."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def run(cmd: list[str], threads: int) -> str:
    """Run ``cmd``; exit with its output tail if it fails; return its stdout."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(threads), cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:5])} ... failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def run_snippet(snippet: str, request: dict[str, Any]) -> dict[str, Any]:
    """Run a timing snippet in a fresh interpreter and return its RESULT record."""
    out = run([sys.executable, "-c", snippet, json.dumps(request)], request["threads"])
    line = next(x for x in reversed(out.splitlines()) if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def prepare(args: argparse.Namespace) -> tuple[Path, Path]:
    """The demo data-bin (``knnlm prepare demo``) and a checkpoint trained for ``--updates`` updates."""
    from knnlm.data import prepare_demo

    work, tokens_per_sample = args.workdir, args.tokens_per_sample
    data = work / "data-bin" / "demo"
    if not (data / "meta.json").is_file():
        prepare_demo(work / "data-bin")
    ckpt_dir = work / f"ckpt-{args.arch}-{args.criterion}-tps{tokens_per_sample}-u{args.updates}"
    ckpt = ckpt_dir / "checkpoint_last.pt"
    if not ckpt.is_file():
        run(
            [
                sys.executable, "-m", "fairseq_cli.train", str(data), "--user-dir", str(USER_DIR),
                "--task", "language_modeling", "--arch", args.arch, "--criterion", args.criterion,
                "--tokens-per-sample", str(tokens_per_sample),
                "--sample-break-mode", "none", "--max-tokens", str(4 * tokens_per_sample),
                "--optimizer", "adam", "--lr", "0.0005", "--max-update", str(args.updates),
                "--ddp-backend", "legacy_ddp", "--save-dir", str(ckpt_dir), "--no-epoch-checkpoints",
                "--no-save-optimizer-state",
                "--disable-validation", "--seed", "1", "--cpu", "--num-workers", "0", "--no-progress-bar",
            ],
            args.threads,
        )  # fmt: skip
    return data, ckpt


def read_through(paths: list[Path]) -> None:
    """Read files once so that every timed run finds them in the page cache."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 22):
                pass


def eval_lm_request(data: Path, ckpt: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The eval_lm worker's request: its command-line arguments."""
    argv = [
        str(data), "--path", str(ckpt), "--user-dir", str(USER_DIR), "--gen-subset", args.split,
        "--tokens-per-sample", str(args.tokens_per_sample), "--context-window", str(args.context_window),
        "--max-tokens", str(args.max_tokens), "--cpu", "--num-workers", "0", "--no-progress-bar",
    ]  # fmt: skip
    return {"threads": args.threads, "argv": argv}


def build_request(data: Path, ckpt: Path, out: Path, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The build worker's request: a ``DatastoreBuildConfig`` as a dict."""
    config = {
        "checkpoint": str(ckpt),
        "data": str(data),
        "out": str(out),
        "split": args.split,
        "tokens_per_sample": args.tokens_per_sample,
        "context_window": args.context_window,
        "max_tokens": build_max_tokens(args),
        "device": "cpu",
        **extra,
    }
    return {"threads": args.threads, "config": config}


def build_max_tokens(args: argparse.Namespace) -> int:
    """The build's ``--max-tokens`` that gives the windows per batch of eval_lm's ``--max-tokens``."""
    windows = max(1, args.max_tokens // (args.tokens_per_sample - args.context_window))
    return windows * args.tokens_per_sample


def run_build(request: dict[str, Any]) -> dict[str, Any]:
    """One build in a fresh process, into an emptied folder that is removed afterwards."""
    out = Path(request["config"]["out"])
    shutil.rmtree(out, ignore_errors=True)
    try:
        return run_snippet(BUILD_SNIPPET, request)
    finally:
        shutil.rmtree(out, ignore_errors=True)



def throughput(args: argparse.Namespace, data: Path, ckpt: Path) -> dict[str, Any]:
    """Interleaved eval_lm / build runs; per-repetition ratios."""
    evaluate = eval_lm_request(data, ckpt, args)
    build = build_request(data, ckpt, args.workdir / "ds-throughput", args)
    jobs = {
        "eval_lm": lambda: run_snippet(EVAL_LM_SNIPPET, evaluate),
        "build": lambda: run_build(build),
        "forward": lambda: run_snippet(FORWARD_SNIPPET, build),
    }
    names = list(jobs)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for rep in range(args.reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            result = jobs[name]()
            runs[name].append(result)
            print(f"rep {rep} {name}: {result['tokens'] / result['wall']:,.0f} tokens/s end to end", flush=True)
    tokens = {r["tokens"] for rs in runs.values() for r in rs}
    if len(tokens) != 1:
        sys.exit(f"eval_lm, the build and the forward pass saw different token counts: {sorted(tokens)}")
    n = tokens.pop()
    scopes = {
        "end_to_end_wall": ("wall", "wall"),
        "end_to_end_cpu": ("cpu", "cpu"),
        "loop_wall": ("loop_wall", "loop_wall"),
    }
    summary: dict[str, Any] = {}
    for scope, (eval_key, build_key) in scopes.items():
        eval_tps = [n / r[eval_key] for r in runs["eval_lm"]]
        build_tps = [n / r[build_key] for r in runs["build"]]
        forward_tps = [n / r[build_key] for r in runs["forward"]]
        summary[scope] = {
            "eval_lm_tokens_per_s": spread(eval_tps),
            "build_tokens_per_s": spread(build_tps),
            "forward_only_tokens_per_s": spread(forward_tps),
            "build_over_eval_lm": spread([b / e for b, e in zip(build_tps, eval_tps, strict=True)]),
            "build_over_forward_only": spread([b / f for b, f in zip(build_tps, forward_tps, strict=True)]),
        }
    return {"tokens": n, "windows_per_batch": runs["build"][0]["windows_per_batch"], "runs": runs, **summary}


def memory(args: argparse.Namespace, data: Path, ckpt: Path) -> list[dict[str, Any]]:
    """Peak RSS of one build process per size (shard 0 of ``num_shards`` of the train split)."""
    rows = []
    for shards in args.memory_shards:
        request = build_request(data, ckpt, args.workdir / f"ds-memory-{shards}", args, num_shards=shards)
        request["config"]["split"] = "train"
        result = run_build(request)
        result["num_shards"] = shards
        rows.append(result)
        peak = result["max_rss_kib"] / 1024
        print(f"memory, shard 0 of {shards}: {result['tokens']:,} tokens, peak RSS {peak:,.0f} MiB", flush=True)
    return rows



def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="knnlm_transformer_lm_small")
    parser.add_argument("--criterion", default="adaptive_loss", help="fairseq-train criterion (the arch's softmax)")
    parser.add_argument("--updates", type=int, default=2, help="fairseq-train updates of the checkpoint")
    parser.add_argument("--split", default="valid", help="split of the demo corpus timed (valid: ~32K tokens)")
    parser.add_argument("--tokens-per-sample", type=int, default=512)
    parser.add_argument("--context-window", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=4096, help="eval_lm's --max-tokens (targets per batch)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of every process")
    parser.add_argument("--memory-shards", type=int, nargs="+", default=[10, 2])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/knnlm-bench/datastore"))
    parser.add_argument("--out", type=Path, default=RESULTS / "datastore")
    args = parser.parse_args(argv)
    if not 0 < args.context_window < args.tokens_per_sample:
        parser.error("--context-window must be in (0, --tokens-per-sample): eval_lm needs a positive one")
    args.workdir.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")

    data, ckpt = prepare(args)
    read_through([ckpt, *sorted(data.glob("*.bin")), *sorted(data.glob("*.idx"))])
    speed = throughput(args, data, ckpt)
    sizes = memory(args, data, ckpt)
    params = sum(p.numel() for p in torch.load(ckpt, map_location="cpu", weights_only=False)["model"].values())

    result = {
        "command": " ".join(["python", "benchmarks/bench_datastore.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": started,
        "machine": {
            "device": "cpu",
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "load_at_start": round(load, 2),
            "threads": args.threads,
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "setting": {
            "arch": args.arch,
            "parameters": params,
            "updates": args.updates,
            "split": args.split,
            "tokens": speed["tokens"],
            "tokens_per_sample": args.tokens_per_sample,
            "context_window": args.context_window,
            "eval_lm_max_tokens": args.max_tokens,
            "build_max_tokens": build_max_tokens(args),
            "windows_per_batch": speed["windows_per_batch"],
            "key_types": ["att", "ffn"],
            "reps": args.reps,
        },
        "throughput": {k: v for k, v in speed.items() if k not in ("tokens", "windows_per_batch")},
        "memory": sizes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    """The results table."""
    setting, machine, speed = result["setting"], result["machine"], result["throughput"]
    lines = [
        "# Datastore build benchmark",
        "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}. Device: CPU ({machine['cpu']}), {machine['cpus']} cores shared with other jobs "
        f"(load {machine['load_at_start']} at start), {machine['threads']} thread(s) per process, "
        f"torch {machine['torch']}, Python {machine['python']}.",
        "",
        f"Checkpoint: `{setting['arch']}` ({setting['parameters']:,} parameters, {setting['updates']} updates of "
        f"`fairseq-train` on the demo corpus). Split: demo `{setting['split']}`, {setting['tokens']:,} tokens. "
        f"Windows of {setting['tokens_per_sample']} tokens carrying {setting['context_window']} of context, "
        f"{setting['windows_per_batch']} windows per batch (eval_lm `--max-tokens {setting['eval_lm_max_tokens']}`, "
        f"build `--max-tokens {setting['build_max_tokens']}`); the build writes `att` and `ffn` keys in one pass. "
        f"{setting['reps']} repetitions, each one eval_lm, one build and one bare-forward process "
        "(`decoder.extract_features` over the same batches: no output layer, nothing kept), in rotating order.",
        "",
        "Ratio = median over repetitions of build tokens/s ÷ eval_lm tokens/s of the same repetition "
        "(min–max in brackets). End to end: `eval_lm.main(cfg)` vs `build_datastore(cfg)`, model and data loading "
        "included, imports excluded. Loop: eval_lm's own forward timer (its batch collation excluded) vs the "
        "build's whole batch loop (batch assembly, forward, key gathering, writes, fsync) vs the bare forward calls.",
        "",
        "| scope | clock | eval_lm tokens/s | build tokens/s | bare forward tokens/s | "
        "build / eval_lm (goal ≥ 0.8) | build / bare forward |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    labels = {
        "end_to_end_wall": ("end to end", "wall"),
        "end_to_end_cpu": ("end to end", "CPU"),
        "loop_wall": ("loop", "wall"),
    }
    for scope, (label, clock) in labels.items():
        row = speed[scope]
        ratio, floor = row["build_over_eval_lm"], row["build_over_forward_only"]
        lines.append(
            f"| {label} | {clock} | {row['eval_lm_tokens_per_s']['median']:,.0f} | "
            f"{row['build_tokens_per_s']['median']:,.0f} | {row['forward_only_tokens_per_s']['median']:,.0f} | "
            f"**{ratio['median']:.2f}** [{ratio['min']:.2f}–{ratio['max']:.2f}] | "
            f"{floor['median']:.2f} [{floor['min']:.2f}–{floor['max']:.2f}] |"
        )
    lines += [
        "",
        "## Peak memory of a build",
        "",
        "One build process per size (shard 0 of N of the demo train split, same settings as above); "
        "peak RSS is `ru_maxrss` at the end of the build, next to the RSS after the process' imports.",
        "",
        "| shard | tokens | keys + values written | RSS after imports | peak RSS | peak − imports |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["memory"]:
        lines.append(
            f"| 0 of {row['num_shards']} | {row['tokens']:,} | {row['keys_bytes'] / 2**20:,.1f} MiB | "
            f"{row['rss_after_imports_kib'] / 1024:,.0f} MiB | {row['max_rss_kib'] / 1024:,.0f} MiB | "
            f"{(row['max_rss_kib'] - row['rss_after_imports_kib']) / 1024:,.0f} MiB |"
        )
    first, last = result["memory"][0], result["memory"][-1]
    rss = last["max_rss_kib"] / first["max_rss_kib"]
    lines += [
        "",
        f"{last['tokens'] / first['tokens']:.1f}× the tokens: peak RSS ×{rss:.2f}, "
        f"written data ×{last['keys_bytes'] / first['keys_bytes']:.1f}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
