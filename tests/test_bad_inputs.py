"""Bad inputs through the real ``knnlm`` command line: one clear line each, and nothing already built is touched.

Every case runs the CLI in a subprocess over tiny artifacts (a checkpoint, its data-bin,
a datastore, an index, a dumped and retrieved cache) and asserts that it exits with
status 2, prints exactly one line — ``knnlm <command>: error: ...`` naming the option or
file and the fix — with no traceback, and leaves every file of the artifacts
byte-identical. Cases run two at a time (each one is mostly Python start-up).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from knnlm.io import LOCK_FILE

TPS, CW = 48, 16


@dataclass
class Case:
    name: str
    argv: list[str]
    message: str  # a regex the one error line must match
    setup: Callable[[Path], object] | None = None
    files: dict[str, bytes] = field(default_factory=dict)  # extra inputs written under the case's folder


@pytest.fixture(scope="module")
def artifacts(tiny_checkpoint, tiny_data_bin, tmp_path_factory):
    """Tiny artifacts every case may read and none may change."""
    from knnlm.datastore import DatastoreBuildConfig, IndexBuildConfig, build_datastore, build_index, write_datastore
    from knnlm.datastore.store import Datastore
    from knnlm.evaluation.dump import LMDumpConfig, RetrievalConfig, dump_lm, dump_retrieval

    root = tmp_path_factory.mktemp("artifacts")
    shutil.copyfile(tiny_checkpoint, root / "model.pt")
    shutil.copytree(tiny_data_bin, root / "data")
    common = {"tokens_per_sample": TPS, "context_window": CW, "max_tokens": 256, "device": "cpu"}
    (store,) = build_datastore(DatastoreBuildConfig(checkpoint=str(root / "model.pt"), data=str(root / "data"),
                                                    out=str(root / "ds"), key_types=["att"], **common))
    build_index(IndexBuildConfig(datastore=str(store), out=str(root / "att.flat"), factory="Flat", metric="l2",
                                 device="cpu"))
    dump_lm(LMDumpConfig(checkpoint=str(root / "model.pt"), data=str(root / "data"), out=str(root / "cache"),
                         split="valid", **common))
    dump_retrieval(RetrievalConfig(cache=str(root / "cache"), datastore=str(store), index=str(root / "att.flat"),
                                   k_max=8, device="cpu"))
    real = Datastore.open(store)
    other = write_datastore(root / "other-ckpt", np.asarray(real.keys), np.asarray(real.vals), key_type="att",
                            source={**real.meta["source"], "checkpoint_sha256": "0" * 64})
    build_index(IndexBuildConfig(datastore=str(other.path), out=str(root / "other.flat"), factory="Flat",
                                 metric="l2", device="cpu"))
    # another data-bin whose dictionary has the same size and other symbols
    shutil.copytree(root / "data", root / "data-swapped")
    lines = (root / "data-swapped" / "dict.txt").read_text(encoding="utf-8").splitlines()
    (root / "data-swapped" / "dict.txt").write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE and not p.name.endswith(".lock")
    }


def cases(a: Path) -> list[Case]:
    ck, data, ds, cache = str(a / "model.pt"), str(a / "data"), str(a / "ds" / "att"), str(a / "cache")
    build = ["datastore", "build", "--checkpoint", ck, "--data", data, "--split", "valid",
             "--tokens-per-sample", str(TPS), "--context-window", str(CW)]
    dump = ["eval", "dump", "--checkpoint", ck, "--data", data, "--split", "valid",
            "--tokens-per-sample", str(TPS), "--context-window", str(CW)]
    retrieve = ["eval", "retrieve", "--cache", cache, "--datastore", ds]
    score = ["score", "--valid-cache", cache, "--split", "valid", "--k", "8"]
    inspect = ["inspect", "--cache", cache, "--lambda", "0.25", "--k", "8"]
    return [
        # datastore build
        Case("build: missing checkpoint", ["datastore", "build", "--checkpoint", "nope.pt", "--data", data,
                                           "--out", "NEW"], r"checkpoint nope\.pt does not exist; pass --checkpoint"),
        Case("build: not a checkpoint", ["datastore", "build", "--checkpoint", "junk.pt", "--data", data,
                                         "--out", "NEW"], r"junk\.pt is not a readable fairseq checkpoint",
             files={"junk.pt": b"not a checkpoint"}),
        Case("build: data is not a data-bin", ["datastore", "build", "--checkpoint", ck, "--data", "emptydir",
                                               "--out", "NEW"], r"dict\.txt is missing; --data must be a fairseq",
             setup=lambda w: (w / "emptydir").mkdir()),
        Case("build: unknown split", [*build, "--split", "dev", "--out", "NEW"], r"split 'dev' not found .*--split"),
        Case("build: unknown key type", [*build, "--key-types", "foo", "--out", "NEW"], r"--key-types must name"),
        Case("build: subsample 0", [*build, "--subsample", "0", "--out", "NEW"], r"--subsample must be in \(0, 1\]"),
        Case("build: subsample nan", [*build, "--subsample", "nan", "--out", "NEW"], r"--subsample must be in"),
        Case("build: max-tokens 0", [*build, "--max-tokens", "0", "--out", "NEW"], r"--max-tokens must be at least 1"),
        Case("build: tokens-per-sample 0", [*build, "--tokens-per-sample", "0", "--out", "NEW"],
             r"--tokens-per-sample must be at least 1"),
        Case("build: context window >= window", [*build, "--context-window", str(TPS), "--out", "NEW"],
             r"--context-window must be in \[0, --tokens-per-sample\)"),
        Case("build: shard id out of range", [*build, "--num-shards", "2", "--shard-id", "2", "--out", "NEW"],
             r"--shard-id must be in \[0, --num-shards\)"),
        Case("build: unknown device", [*build, "--device", "tpu9", "--out", "NEW"], r"--device 'tpu9' is not a device"),
        Case("build: GPU without a GPU", [*build, "--device", "cuda", "--out", "NEW"],
             r"asked for a GPU but torch sees none"),
        Case("build: out is a file", [*build, "--out", "afile"], r"cannot write datastore folder afile",
             files={"afile": b"x"}),
        Case("build: other settings into a complete datastore", [*build, "--split", "train", "--context-window", "8",
                                                                  "--out", str(a / "ds"), "--key-types", "att"],
             r"--overwrite"),
        Case("build: folder locked by another writer", [*build, "--out", "locked"],
             r"being written by another knnlm process \(pid \d+"),
        # datastore info
        Case("datastore info: missing", ["datastore", "info", "nowhere"], r"nowhere does not exist"),
        Case("datastore info: half-written", ["datastore", "info", "half"], r"half-written datastore .*resume",
             setup=lambda w: ((w / "half").mkdir(), (w / "half" / "progress.json").write_text("{}"))),
        # index build / info
        Case("index: missing datastore", ["index", "build", "--datastore", "nowhere", "--out", "i.faiss"],
             r"datastore folder nowhere does not exist"),
        Case("index: unknown factory", ["index", "build", "--datastore", ds, "--out", "i.faiss", "--factory",
                                        "IVFbogus"], r"--factory 'IVFbogus'"),
        Case("index: nprobe 0", ["index", "build", "--datastore", ds, "--out", "i.faiss", "--nprobe", "0"],
             r"--nprobe must be at least 1"),
        Case("index: train size 0", ["index", "build", "--datastore", ds, "--out", "i.faiss", "--train-size", "0"],
             r"--train-size must be at least 1"),
        Case("index: other settings over a complete index", ["index", "build", "--datastore", ds, "--out",
                                                              str(a / "att.flat"), "--metric", "ip",
                                                              "--factory", "Flat"], r"--overwrite"),
        Case("index info: no sidecar", ["index", "info", "junk.faiss"], r"junk\.faiss\.meta\.json is missing",
             files={"junk.faiss": b"junk"}),
        Case("index info: flipped bytes", ["index", "info", "flipped.faiss"], r"sha256 differs",
             setup=lambda w: flipped_copy(a / "att.flat", w / "flipped.faiss")),
        # eval dump
        Case("dump: limit-tokens 0", [*dump, "--limit-tokens", "0", "--out", "NEW"], r"--limit-tokens must be at"),
        Case("dump: negative context window", [*dump, "--context-window", "-1", "--out", "NEW"],
             r"--context-window must be at least 0"),
        Case("dump: out is a file", [*dump, "--out", "afile"], r"--out afile is a file", files={"afile": b"x"}),
        Case("dump: other inputs into a complete cache", [*dump, "--limit-tokens", "100", "--out", cache],
             r"holds a cache of other inputs .*--overwrite"),
        Case("dump: data-bin with another dictionary", [*dump, "--data", str(a / "data-swapped"), "--out", "NEW"],
             r"is not the dictionary .* was trained with"),
        Case("dump: unknown device", [*dump, "--device", "gpu", "--out", "NEW"], r"--device 'gpu' is not a device"),
        # eval retrieve
        Case("retrieve: not a cache", ["eval", "retrieve", "--cache", "nowhere", "--datastore", ds, "--similarity",
                                       "l2"], r"--cache nowhere is not a cache"),
        Case("retrieve: k-max 0", [*retrieve, "--similarity", "l2", "--k-max", "0"], r"--k-max must be at least 1"),
        Case("retrieve: nprobe 0", [*retrieve, "--index", str(a / "att.flat"), "--nprobe", "0"],
             r"--nprobe must be at least 1"),
        Case("retrieve: exact search without similarity", retrieve, r"exact search needs --similarity"),
        Case("retrieve: real score without index", [*retrieve, "--similarity", "l2", "--real-score"],
             r"--real-score .*give --index"),
        Case("retrieve: datastore of another checkpoint", ["eval", "retrieve", "--cache", cache, "--datastore",
                                                           str(a / "other-ckpt"), "--similarity", "l2"],
             r"built from checkpoint .*--allow-other-checkpoint"),
        Case("retrieve: index of another datastore", [*retrieve, "--index", str(a / "other.flat")],
             r"was built from datastore .*not from"),
        Case("retrieve: other settings over a retrieval", [*retrieve, "--index", str(a / "att.flat"), "--k-max", "4"],
             r"holds a retrieval of other settings .*--overwrite"),
        Case("retrieve: corrupt index", [*retrieve, "--index", "flipped.faiss"], r"sha256 differs",
             setup=lambda w: flipped_copy(a / "att.flat", w / "flipped.faiss")),
        Case("retrieve: cache locked by another writer", [*retrieve, "--similarity", "l2"],
             r"being written by another knnlm process"),
        # score and report
        Case("score: missing cache", ["score", "--valid-cache", "nowhere", "--split", "valid", "--out", "r.jsonl"],
             r"cache folder nowhere does not exist"),
        Case("score: k 0", [*score, "--k", "0", "--out", "r.jsonl"], r"--k must be a positive integer"),
        Case("score: negative temperature", [*score, "--temperature", "-1", "--out", "r.jsonl"],
             r"--temperature must be > 0"),
        Case("score: lambda 2", [*score, "--lambda", "2", "--out", "r.jsonl"], r"--lambda must be 'tune' or a number"),
        Case("score: out is a folder", [*score, "--out", "."], r"--out \. is a folder"),
        Case("report: missing results", ["report", "nope.jsonl", "--out", "rep"], r"nope\.jsonl does not exist"),
        # inspect
        Case("inspect: position out of range", [*inspect, "--position", "99999999"],
             r"--position 99999999 is outside the [\d,]+ tokens of .*\(0\.\.\d+\)"),
        Case("inspect: word not in the dictionary", [*inspect, "--word", "zqxwv"],
             r"--word 'zqxwv' is not in the dictionary"),
        Case("inspect: occurrence beyond the last", [*inspect, "--word", "</s>", "--occurrence", "99999"],
             r"--occurrence 99999: '</s>' is a target \d+ time\(s\)"),
        Case("inspect: no retrieval of that metric", [*inspect, "--position", "0", "--similarity", "ip"],
             r"has no retrieval with key type att, similarity ip, faiss mask, faiss score; it holds: att-l2-faiss"),
        Case("inspect: k above k-max", [*inspect, "--position", "0", "--k", "64"], r"--k 64 exceeds k_max=8"),
    ]


def flipped_copy(src: Path, dst: Path) -> None:
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dst.write_bytes(bytes(data))
    shutil.copyfile(f"{src}.meta.json", f"{dst}.meta.json")


HOLD = "import sys, time\nfrom knnlm.io import WriterLock\nwith WriterLock.for_folder(sys.argv[1], 'x'):\n" \
       "    print('locked', flush=True)\n    time.sleep(600)\n"


def run_case(case: Case, artifacts: Path, work: Path) -> subprocess.CompletedProcess:
    work.mkdir(parents=True)
    for name, content in case.files.items():
        (work / name).write_bytes(content)
    if case.setup is not None:
        case.setup(work)
    holder = None
    if "locked" in case.name:
        folder = work / "locked" if case.argv[0] == "datastore" else artifacts / "cache"
        holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "locked"
    try:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        return subprocess.run([sys.executable, "-m", "knnlm.cli.main", *case.argv], cwd=work, capture_output=True,
                              text=True, env=env, timeout=600)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()


def test_every_bad_input_is_one_clear_line_and_touches_nothing(artifacts, tmp_path):
    all_cases = cases(artifacts)
    assert len(all_cases) >= 40
    before = snapshot(artifacts)
    # cases that take the shared cache's writer lock (or hold it) would refuse each other: run them one at a
    # time, the rest two at a time
    shared_cache = str(artifacts / "cache")
    locked = [c for c in all_cases if "locked" in c.name or (c.argv[0] == "eval" and shared_cache in c.argv)]
    free = [c for c in all_cases if c not in locked]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda ic: run_case(ic[1], artifacts, tmp_path / f"case{ic[0]}"), enumerate(free)))
    results += [run_case(c, artifacts, tmp_path / f"lock{i}") for i, c in enumerate(locked)]
    failures = []
    for case, proc in zip(free + locked, results, strict=True):
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        command = case.argv[0]
        problems = []
        if proc.returncode != 2:
            problems.append(f"exit {proc.returncode}")
        if "Traceback" in proc.stderr:
            problems.append("traceback")
        if len(lines) != 1:
            problems.append(f"{len(lines)} lines")
        elif not lines[0].startswith(f"knnlm {command}: error: ") or not re.search(case.message, lines[0]):
            problems.append("message")
        if problems:
            failures.append(f"{case.name}: {', '.join(problems)}\n    {proc.stderr.strip()[-600:]}")
    assert not failures, f"{len(failures)} of {len(all_cases)} cases failed:\n" + "\n".join(failures)
    after = snapshot(artifacts)
    assert after == before, {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    summary = {"cases": len(all_cases), "refused_cleanly": len(all_cases), "tracebacks": 0}
    print(json.dumps(summary))
