"""``knnlm index {build,train,merge,info}``; also a hydra app for ``build``.

Hydra::

    python -m knnlm.cli.index datastore=datastores/wt103/ffn out=indexes/wt103.ffn.faiss factory=IVF4096,PQ64
"""

from __future__ import annotations

import argparse
import json
import sys

from knnlm.cli.configs import run_schema_app
from knnlm.cli.options import add_config_arguments, config_from_args
from knnlm.datastore.index import IndexBuildConfig, build_index, index_info
from knnlm.datastore.shards import merge_index_ondisk
from knnlm.datastore.similarity import SIMILARITIES
from knnlm.datastore.store import Datastore


def _add_build_options(parser: argparse.ArgumentParser, train_only: bool) -> None:
    skip = {"train_only", "add_chunk", "trained"} if train_only else {"train_only"}
    add_config_arguments(parser, IndexBuildConfig, skip=skip, choices={"metric": SIMILARITIES})


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``index`` and its actions to the ``knnlm`` command."""
    parser = subparsers.add_parser(
        "index",
        help="build and inspect FAISS indexes over datastores",
        description="Build and inspect FAISS indexes over datastores.",
    )
    actions = parser.add_subparsers(dest="index_action", required=True, metavar="ACTION")

    build = actions.add_parser("build", help="train and fill an index over a datastore")
    _add_build_options(build, train_only=False)
    build.set_defaults(func=_build, train_only=False)

    train = actions.add_parser("train", help="only train an (empty) index, for sharded adding")
    _add_build_options(train, train_only=True)
    train.set_defaults(func=_build, train_only=True)

    merge = actions.add_parser("merge", help="merge shard indexes into one with on-disk inverted lists")
    merge.add_argument("--trained", required=True, help="the trained index the shard indexes were built from")
    merge.add_argument("--shards", nargs="+", required=True, help="shard index files, in shard order")
    merge.add_argument("--datastore", required=True, help="the merged datastore (knnlm datastore merge)")
    merge.add_argument("--out", required=True)
    merge.add_argument("--ivfdata", default=None, help="inverted-lists file (default: OUT with .ivfdata)")
    merge.add_argument("--overwrite", action="store_true")
    merge.set_defaults(func=_merge)

    info = actions.add_parser("info", help="verify an index's metadata and print it")
    info.add_argument("path")
    info.set_defaults(func=_info)


def _build(args: argparse.Namespace) -> None:
    out = build_index(config_from_args(IndexBuildConfig, args))
    meta = index_info(out)
    print(
        f"{out}: {meta['role']} {meta['factory']} ({meta['metric']}), ntotal {meta.get('ntotal')}, "
        f"nprobe {meta.get('nprobe')}"
    )


def _merge(args: argparse.Namespace) -> None:
    store = Datastore.open(args.datastore)
    out = merge_index_ondisk(args.trained, args.shards, store, args.out, args.ivfdata, overwrite=args.overwrite)
    print(f"{out}: {index_info(out)['ntotal']} vectors, lists in {index_info(out)['ondisk']['ivfdata']}")


def _info(args: argparse.Namespace) -> None:
    print(json.dumps(index_info(args.path), indent=2, sort_keys=True))


def hydra_main() -> int:
    """``python -m knnlm.cli.index key=value ...``: ``index build`` as a hydra app."""
    return run_schema_app("index_build", IndexBuildConfig, build_index, "knnlm index build")


if __name__ == "__main__":
    sys.exit(hydra_main())
