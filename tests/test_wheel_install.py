"""A wheel of knnlm installed outside the checkout runs a hydra app from the configs it ships."""

from __future__ import annotations

import json
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np

from knnlm.evaluation.cache import RetrievalArrays, RetrievalInfo, write_cache

ROOT = Path(__file__).resolve().parents[1]


def synthetic_cache(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    n, k, vocab = 200, 8, 50
    targets = rng.integers(0, vocab, n)
    vals = rng.integers(0, vocab, (n, k))
    vals[:, 0] = targets  # the nearest neighbour is often right
    scores = -np.sort(rng.exponential(10.0, (n, k)), axis=1)
    info = RetrievalInfo(name="att-l2-faiss", key_type="att", similarity="l2", mask_source="faiss",
                         score_source="faiss", k_max=k, datastore={"size": 1000})
    return write_cache(path, split=path.name, targets=targets, lm_logprob=np.log(rng.uniform(0.001, 0.2, n)),
                       dict_size=vocab, checkpoint_fingerprint="ab" * 32, key_dims={"att": 4},
                       retrievals=[RetrievalArrays(info=info, ids=rng.integers(0, 1000, (n, k)), scores=scores,
                                                   vals=vals)])


def test_wheel_outside_the_checkout_runs_knnlm_score_through_its_hydra_config(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", str(ROOT), "-w", str(dist)], check=True, capture_output=True, timeout=600)
    (wheel,) = dist.glob("knnlm-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    # the test environment's packages (torch, fairseq, hydra, ...) stay visible; knnlm itself comes from the wheel
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    outer = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]} if Path(p).is_dir()]
    (Path(purelib) / "test_env.pth").write_text("\n".join(outer) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--target", purelib, str(wheel)], check=True, capture_output=True, timeout=600)
    work = tmp_path / "elsewhere"
    work.mkdir()
    valid, test = synthetic_cache(work / "valid", 0), synthetic_cache(work / "test", 1)
    proc = subprocess.run(
        [str(python), "-m", "knnlm.cli.score", f"valid_cache={valid}", f"test_cache={test}", "out=results.jsonl",
         "k=8"],
        cwd=work, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    where = subprocess.run([str(python), "-c", "import knnlm, sys; print(knnlm.__file__)"], cwd=work,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(purelib) and str(ROOT) not in where  # the wheel's copy, not the checkout
    (line,) = [json.loads(x) for x in (work / "results.jsonl").read_text().splitlines()]
    assert line["knobs"]["k"] == 8 and line["knobs"]["split"] == "test" and line["metrics"]["interp_ppl"] > 0
