"""``knnlm replace``: the inputs of the trainable datastore replacements (Xu et al. 2023, Table 6, App. C.3).

    knnlm replace sizes --datastore ds/ffn --by frequency --n 3 --data DATA_BIN --out sizes/freq-n3.npy
    knnlm replace sizes --datastore ds/ffn --by loss --n 3 --checkpoint CKPT --data DATA_BIN --out sizes/loss-n3.npy
    knnlm replace clusters --datastore ds/att --per-word 1 --data DATA_BIN --out clusters/att-c1

Sizes feed ``fairseq-train --arch knnlm_ds_replacement --ds-sizes FILE``; clusters feed
``--ds-kind clusters --ds-clusters DIR`` or, untrained, ``knnlm eval component --clusters DIR``.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np

from knnlm.errors import KnnlmError
from knnlm.io import write_json_atomic


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("replace", help="adaptive sizes and clusters for datastore replacements")
    jobs = parser.add_subparsers(dest="job", required=True, metavar="JOB")

    sizes = jobs.add_parser(
        "sizes",
        help="rows of W_ds per word: 1 + log_b f_v, b solved so that they sum to n·V (Table 6)",
        description="f_v is the word's frequency as a training target (--by frequency) or its total training "
        "loss under the base LM (--by loss, recomputed from the ffn datastore's keys). Writes an int64 .npy "
        "and a .json beside it.",
    )
    sizes.add_argument("--datastore", required=True, help="datastore of the training split (ffn keys for --by loss)")
    sizes.add_argument("--by", required=True, choices=("frequency", "loss"))
    sizes.add_argument("--n", required=True, type=int, help="average rows per word (total n·V)")
    sizes.add_argument("--data", required=True, help="data-bin with dict.txt (the vocabulary V)")
    sizes.add_argument("--checkpoint", help="base LM (needed for --by loss)")
    sizes.add_argument("--batch", type=int, default=4096)
    sizes.add_argument("--out", required=True, help="sizes file to write (.npy)")
    sizes.set_defaults(func=_sizes)

    clusters = jobs.add_parser(
        "clusters",
        help="k-means of a datastore into centroids and their next-word mix (Appendix C.3)",
    )
    clusters.add_argument("--datastore", required=True)
    group = clusters.add_mutually_exclusive_group(required=True)
    group.add_argument("--per-word", type=float, help="c: c·V centroids")
    group.add_argument("--clusters", type=int, help="number of centroids")
    clusters.add_argument("--data", required=True, help="data-bin with dict.txt (the vocabulary V)")
    clusters.add_argument("--similarity", choices=("l2", "ip"), default="l2")
    clusters.add_argument("--train-size", type=int, default=500_000, help="keys sampled to train k-means")
    clusters.add_argument("--niter", type=int, default=20)
    clusters.add_argument("--seed", type=int, default=1)
    clusters.add_argument("--out", required=True, help="clusters folder to write")
    clusters.set_defaults(func=_clusters)


def _vocab_size(data: str) -> int:
    from fairseq.data import Dictionary

    path = Path(data) / "dict.txt"
    if not path.is_file():
        raise KnnlmError(f"{path} is missing; --data must be the base LM's data-bin")
    return len(Dictionary.load(str(path)))


def training_nll(store, checkpoint: str, data: str, batch: int) -> np.ndarray:
    """Per-entry NLL of the base LM, from the ffn keys (the output layer's exact input)."""
    import torch

    from knnlm.models.fairseq_lm import load_language_model
    from knnlm.softmax_alternatives.base import output_log_probs

    if store.key_type != "ffn":
        raise KnnlmError(f"--by loss needs the ffn datastore (the output layer's input); {store.path} holds "
                         f"{store.key_type} keys")
    model, _task = load_language_model(checkpoint, data)
    model.eval()
    nll = np.empty(store.num_keys, dtype=np.float64)
    with torch.no_grad():
        for start in range(0, store.num_keys, batch):
            end = min(store.num_keys, start + batch)
            keys = torch.from_numpy(np.asarray(store.keys[start:end], dtype=np.float32))
            vals = torch.from_numpy(np.array(store.vals[start:end], dtype=np.int64)).unsqueeze(-1)
            nll[start:end] = -output_log_probs(model.decoder, keys).gather(-1, vals).squeeze(-1).double().numpy()
    return nll


def _sizes(args: argparse.Namespace) -> None:
    from knnlm.datastore.store import Datastore
    from knnlm.softmax_alternatives.sizes import adaptive_sizes, frequencies, solve_base, total_losses

    out = Path(args.out)
    if out.suffix != ".npy":
        raise KnnlmError(f"--out {out} must end in .npy")
    vocab = _vocab_size(args.data)
    store = Datastore.open(args.datastore)
    vals = np.asarray(store.vals)
    if args.by == "frequency":
        weights = frequencies(vals, vocab)
    else:
        if not args.checkpoint:
            raise KnnlmError("--by loss needs --checkpoint (the base LM whose training loss sizes the words)")
        weights = total_losses(vals, training_nll(store, args.checkpoint, args.data, args.batch), vocab)
    sizes = adaptive_sizes(weights, args.n)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npy")
    np.save(tmp, sizes)
    os.replace(tmp, out)
    base = solve_base(weights, args.n)
    write_json_atomic(
        out.with_suffix(".json"),
        {
            "by": args.by, "n": args.n, "vocab_size": vocab, "rows": int(sizes.sum()),
            "base": None if math.isinf(base) else base, "max_rows": int(sizes.max()),
            "datastore": str(Path(args.datastore).resolve()), "datastore_id": store.datastore_id,
        },
    )
    print(f"{out}: {int(sizes.sum())} rows for {vocab} words (b = {base:.4g}, max {int(sizes.max())} per word)")


def _clusters(args: argparse.Namespace) -> None:
    from knnlm.datastore.store import Datastore
    from knnlm.softmax_alternatives.clusters import build_clusters, save_clusters

    vocab = _vocab_size(args.data)
    store = Datastore.open(args.datastore)
    n_clusters = args.clusters if args.clusters is not None else max(1, round(args.per_word * vocab))
    centroids, rows, cols, probs = build_clusters(
        store, n_clusters, vocab, similarity=args.similarity, train_size=args.train_size, niter=args.niter,
        seed=args.seed,
    )
    meta = {
        "vocab_size": vocab, "requested_clusters": n_clusters, "similarity": args.similarity,
        "key_type": store.key_type, "datastore": str(Path(args.datastore).resolve()),
        "datastore_id": store.datastore_id, "train_size": args.train_size, "niter": args.niter, "seed": args.seed,
    }
    out = save_clusters(args.out, centroids, rows, cols, probs, meta)
    print(f"{out}: {len(centroids)} non-empty clusters of {n_clusters} over {store.num_keys} {store.key_type} keys")
