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
from dataclasses import fields

from knnlm.datastore.build import DatastoreBuildConfig, build_datastore, build_summary
from knnlm.datastore.shards import merge_datastores
from knnlm.datastore.store import Datastore
from knnlm.errors import KnnlmError

_DEFAULTS = DatastoreBuildConfig()


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
    add_base_model_arguments(build)
    build.add_argument("--out", required=True, help="output folder; datastores go to OUT/att and OUT/ffn")
    build.add_argument("--split", default=_DEFAULTS.split)
    build.add_argument(
        "--key-types",
        default=",".join(_DEFAULTS.key_types),
        help="comma-separated subset of att,ffn (default: both, one forward pass)",
    )
    build.add_argument(
        "--tokens-per-sample",
        type=int,
        default=None,
        help="longest window, as fairseq 0.12 eval_lm (default: the checkpoint's)",
    )
    build.add_argument(
        "--context-window",
        type=int,
        default=None,
        help="left context carried into each window (default: tokens-per-sample / 2)",
    )
    build.add_argument(
        "--max-tokens",
        type=int,
        default=_DEFAULTS.max_tokens,
        help="tokens per batch; windows per batch = max-tokens // tokens-per-sample",
    )
    build.add_argument(
        "--chunk-tokens",
        type=int,
        default=_DEFAULTS.chunk_tokens,
        help="target tokens between commits (resume granularity)",
    )
    build.add_argument(
        "--subsample",
        type=float,
        default=None,
        metavar="RATIO",
        help="keep a uniform random RATIO of the tokens (with --seed)",
    )
    build.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    build.add_argument("--num-shards", type=int, default=1)
    build.add_argument("--shard-id", type=int, default=0)
    build.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:N")
    build.add_argument(
        "--fp16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="forward in fp16 (default: on GPU)",
    )
    build.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a datastore built with other settings instead of refusing",
    )
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


def add_base_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint`` or ``--hf-model`` (one of them), and ``--data`` to go with it."""
    parser.add_argument("--checkpoint", default=None, help="fairseq LM checkpoint (.pt)")
    parser.add_argument(
        "--hf-model",
        default=None,
        metavar="NAME_OR_PATH",
        help="instead of --checkpoint: a Hugging Face causal LM (hub name or save_pretrained folder; "
        "pip install -e .[hf]); tokens are its tokenizer's",
    )
    parser.add_argument("--hf-revision", default=None, help="hub revision (branch, tag or commit) of --hf-model")
    parser.add_argument(
        "--data",
        required=True,
        help="fairseq data-bin folder (dict.txt, SPLIT.bin/.idx); with --hf-model a folder of raw text "
        "(wiki.SPLIT.raw, wiki.SPLIT.tokens or SPLIT.txt)",
    )


def config_from_args(args: argparse.Namespace) -> DatastoreBuildConfig:
    """The build configuration of parsed ``datastore build`` arguments."""
    names = {f.name for f in fields(DatastoreBuildConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["key_types"] = [k.strip() for k in args.key_types.split(",") if k.strip()]
    return DatastoreBuildConfig(**values)


def _build(args: argparse.Namespace) -> None:
    print(build_summary(build_datastore(config_from_args(args))))


def _merge(args: argparse.Namespace) -> None:
    print(build_summary([merge_datastores(args.shards, args.out, overwrite=args.overwrite)]))


def _info(args: argparse.Namespace) -> None:
    store = Datastore.open(args.path)
    print(json.dumps(store.meta, indent=2, sort_keys=True))


def hydra_main() -> int:
    """``python -m knnlm.cli.datastore key=value ...``: the build as a hydra app."""
    import hydra
    from hydra.core.config_store import ConfigStore
    from omegaconf import DictConfig, OmegaConf

    ConfigStore.instance().store(name="datastore_build", node=DatastoreBuildConfig)
    status = 0

    @hydra.main(version_base=None, config_path=None, config_name="datastore_build")
    def app(cfg: DictConfig) -> None:
        nonlocal status
        try:
            print(build_summary(build_datastore(OmegaConf.to_object(cfg))))
        except KnnlmError as err:
            print(f"knnlm datastore build: error: {err}", file=sys.stderr)
            status = 2

    app()
    return status


if __name__ == "__main__":
    sys.exit(hydra_main())
