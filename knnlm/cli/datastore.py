"""``knnlm datastore {build,merge,info}``; also a hydra app for ``build``.

Hydra::

    python -m knnlm.cli.datastore checkpoint=ckpt.pt data=data-bin/wikitext-103 out=datastores/wt103
    python -m knnlm.cli.datastore --config-dir configs/datastore --config-name wikitext103 \\
        checkpoint=... data=... out=...
"""

from __future__ import annotations

import argparse
import json
import sys

from knnlm.cli.configs import run_schema_app
from knnlm.cli.options import add_config_arguments, config_from_args
from knnlm.datastore.build import DatastoreBuildConfig, build_datastore, build_summary
from knnlm.datastore.shards import merge_datastores
from knnlm.datastore.store import Datastore


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``datastore`` and its actions to the ``knnlm`` command."""
    parser = subparsers.add_parser(
        "datastore",
        help="build, merge and inspect kNN datastores",
        description="Build, merge and inspect kNN datastores.",
    )
    actions = parser.add_subparsers(dest="datastore_action", required=True, metavar="ACTION")

    build = actions.add_parser(
        "build",
        help="checkpoint + split -> OUT/att, OUT/ffn datastores",
        description="Run a fairseq LM (or a Hugging Face causal LM) over a split with eval_lm's contexts and "
        "write one datastore per key type (OUT/<key_type>). Resumes an interrupted build.",
    )
    add_config_arguments(build, DatastoreBuildConfig, metavars={"hf_model": "NAME_OR_PATH", "subsample": "RATIO"})
    build.set_defaults(func=_build)

    merge = actions.add_parser(
        "merge",
        help="merge the shard datastores of one sharded build",
        description="Concatenate shard datastores into one (identical to a one-shot build).",
    )
    merge.add_argument("shards", nargs="+", help="shard datastore folders (all shards of one build)")
    merge.add_argument("--out", required=True)
    merge.add_argument("--overwrite", action="store_true")
    merge.set_defaults(func=_merge)

    info = actions.add_parser("info", help="verify a datastore and print its metadata")
    info.add_argument("path")
    info.set_defaults(func=_info)


def _build(args: argparse.Namespace) -> None:
    print(build_summary(build_datastore(config_from_args(DatastoreBuildConfig, args))))


def _merge(args: argparse.Namespace) -> None:
    print(build_summary([merge_datastores(args.shards, args.out, overwrite=args.overwrite)]))


def _info(args: argparse.Namespace) -> None:
    store = Datastore.open(args.path)
    print(json.dumps(store.meta, indent=2, sort_keys=True))


def hydra_main() -> int:
    """``python -m knnlm.cli.datastore key=value ...``: the build as a hydra app."""
    def job(cfg: DatastoreBuildConfig) -> str:
        return build_summary(build_datastore(cfg))

    return run_schema_app("datastore_build", DatastoreBuildConfig, job, "knnlm datastore build")


if __name__ == "__main__":
    sys.exit(hydra_main())
