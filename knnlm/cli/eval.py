"""``knnlm eval``: the dump phase of the two-phase evaluation.

    knnlm eval dump --checkpoint CKPT --data DATA_BIN --split valid --out caches/valid
    knnlm eval dump --hf-model gpt2 --data RAW_TEXT_DIR --split valid --out caches/valid
    knnlm eval retrieve --cache caches/valid --datastore ds/att --index ds/att.l2.faiss [--real-score]
    knnlm eval retrieve --cache caches/valid --datastore ds/att --similarity l2      # exact ("real mask")
    knnlm eval link --cache caches/valid --out caches-r0.1/valid   # the same tokens, for another datastore
    knnlm eval component --cache caches/valid --name att-n3 --checkpoint heads/att-n3.pt --data DATA_BIN

Then ``knnlm score`` reads the caches.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from knnlm.cli.options import add_config_arguments, config_from_args
from knnlm.datastore.similarity import SIMILARITIES
from knnlm.errors import KnnlmError
from knnlm.evaluation.dump import (
    LMDumpConfig,
    RetrievalConfig,
    describe_perplexity,
    dump_lm,
    dump_retrieval,
    link_cache,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="dump per-token LM outputs and neighbours into a cache")
    jobs = parser.add_subparsers(dest="job", required=True, metavar="JOB")

    dump = jobs.add_parser("dump", help="one LM pass over a split: targets, LM log-probs, att/ffn queries")
    add_config_arguments(dump, LMDumpConfig, defaults={"checkpoint": None}, metavars={"hf_model": "NAME_OR_PATH"})
    dump.set_defaults(func=_dump)

    retrieve = jobs.add_parser("retrieve", help="top-k neighbours of every cached query in one datastore")
    add_config_arguments(retrieve, RetrievalConfig, choices={"similarity": SIMILARITIES})
    retrieve.set_defaults(func=_retrieve)

    link = jobs.add_parser(
        "link",
        help="a cache sharing another's tokens and queries (links), without its retrievals",
        description="Make --out a cache of the same tokens as --cache: its arrays are relative symbolic links to "
        "those of --cache, its retrievals and components none. A cache holds one retrieval per key type, "
        "similarity and sources; neighbours from another datastore of the same keys (e.g. one built with "
        "--subsample) are retrieved into such a linked cache. Does nothing if --out is one already.",
    )
    link.add_argument("--cache", required=True, metavar="DIR", help="the cache whose arrays are shared")
    link.add_argument("--out", required=True, metavar="DIR", help="the linked cache to write")
    link.set_defaults(func=_link)

    component = jobs.add_parser(
        "component",
        help="add a parametric component (datastore replacement, second LM, top-k LM) to a cache",
        description="Evaluate a next-word distribution on the cache's tokens, to be interpolated with the base "
        "LM by `knnlm score --component NAME`. Exactly one source: --checkpoint of a knnlm_ds_replacement "
        "model (its head reads the cached queries), --lm-cache of another LM dumped over the same tokens, "
        "or --topk K with the base --checkpoint (its distribution cut to the top K words, tempered by τ).",
    )
    component.add_argument("--cache", required=True, metavar="DIR", help="cache folder of one split")
    component.add_argument("--name", required=True, help="component name (folder under CACHE/components/)")
    component.add_argument("--checkpoint", metavar="PT", help="replacement checkpoint, or the base LM with --topk")
    component.add_argument("--data", metavar="DIR", help="data-bin with dict.txt (with --checkpoint)")
    component.add_argument("--lm-cache", metavar="DIR", help="cache of the same split dumped from another LM")
    component.add_argument(
        "--topk",
        metavar="K[,K...]",
        help="top-k sparsified base LM (Appendix E); with several k or τ the components are NAME-k<k>-t<τ>",
    )
    component.add_argument("--clusters", metavar="DIR", help="untrained clustered datastore (`knnlm replace clusters`)")
    component.add_argument("--temperature", default="1", metavar="T[,T...]", help="τ of --topk (default 1)")
    component.add_argument("--batch", type=int, default=1024, help="queries per forward")
    component.set_defaults(func=_component)


def _dump(args: argparse.Namespace) -> None:
    out = dump_lm(config_from_args(LMDumpConfig, args))
    units = json.loads((Path(out) / "meta.json").read_text()).get("units") or {}
    print(f"{out}: {describe_perplexity(np.load(Path(out) / 'lm_logprob.npy'), units.get('n_words'))}")
    if units.get("token"):
        print(f"  token = {units['token']}; word = {units.get('word')}")


def _component(args: argparse.Namespace) -> None:
    from knnlm.evaluation.cache import Cache
    from knnlm.evaluation.components import (
        clusters_component,
        head_component,
        lm_component,
        topk_components,
    )

    sources = [
        args.lm_cache is not None,
        args.topk is not None,
        args.clusters is not None,
        args.checkpoint is not None and args.topk is None,
    ]
    if sum(sources) != 1:
        raise KnnlmError(
            "give exactly one of --checkpoint (replacement), --lm-cache, --clusters, or --topk K --checkpoint BASE"
        )
    if args.checkpoint and not args.data:
        raise KnnlmError("--checkpoint needs --data (the data-bin with the dictionary)")
    cache = Cache(args.cache)
    if args.lm_cache:
        logprob, knobs, source = lm_component(cache, Cache(args.lm_cache))
    elif args.clusters:
        logprob, knobs, source = clusters_component(cache, args.clusters, args.batch)
    elif args.topk is not None:
        ks = [int(x) for x in str(args.topk).split(",")]
        temps = [float(x) for x in str(args.temperature).split(",")]
        results = topk_components(cache, args.checkpoint, args.data, ks, temps, args.batch)
        for (k, t), (logprob, knobs, source) in results.items():
            name = args.name if len(results) == 1 else f"{args.name}-k{k}-t{t:g}"
            _write_component(cache, name, logprob, knobs, source)
        return
    else:
        logprob, knobs, source = head_component(cache, args.checkpoint, args.data, args.batch)
    _write_component(cache, args.name, logprob, knobs, source)


def _write_component(cache, name: str, logprob: np.ndarray, knobs: dict, source: dict) -> None:
    from knnlm.evaluation.components import write_component
    from knnlm.scoring import perplexity

    folder = write_component(cache, name, logprob, knobs, source)
    print(f"{folder}: component perplexity {perplexity(logprob).ppl:.2f} ({knobs})")


def _retrieve(args: argparse.Namespace) -> None:
    folder = dump_retrieval(config_from_args(RetrievalConfig, args))
    print(f"wrote {folder}")


def _link(args: argparse.Namespace) -> None:
    print(f"wrote {link_cache(args.cache, args.out)} (arrays linked to {args.cache})")
