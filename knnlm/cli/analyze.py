"""``knnlm analyze``: the papers' analyses as PNG figures plus the numbers behind them (CSV, JSON).

    knnlm analyze frequency  --cache C0 --cache C1 --label 'ω=0' --label 'ω=1' --data-bin D --out OUT
    knnlm analyze clustering --cache C0 --cache C1 --label 'ω=0' --label 'ω=1' --data-bin D --out OUT
    knnlm analyze benefit    --cache C --data-bin D --out OUT
    knnlm analyze position   --cache C [--cache C1 ...] --out OUT
    knnlm analyze stolen     --weights checkpoint.pt [--data-bin D] --out OUT
    knnlm analyze temperature --cache V0 --cache V1 --label 'ω=0' --label 'ω=1' [--test-cache T0 ...]
                             [--datastore D0 ...] [--checkpoint C0 ...] [--shared-lm-cache V0] --out OUT
    knnlm analyze training   --log ckpt0/train.log --log ckpt1/train.log --label 'ω=0' --label 'ω=1' --out OUT

Each writes ``OUT/<name>.png``, ``OUT/<name>.csv`` and, last, ``OUT/<name>.json``
(every setting and summary number). The kNN-LM part uses one retrieval of each
cache (``--retrieval NAME`` or the knobs ``--key-type/--similarity/--mask-source/
--score-source``) with ``--k``, ``--temperature`` and ``--lambda`` (a number, or
``tune`` with one ``--valid-cache`` per ``--cache``). The same analyses run as a hydra
app, one config per analysis in ``configs/analyze/``::

    python -m knnlm.cli.analyze --config-name frequency 'caches=[C0,C1]' 'labels=[ω=0,ω=1]' data_bin=D out=OUT
"""

from __future__ import annotations

import argparse
import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from knnlm.cli.configs import config_dir
from knnlm.errors import KnnlmError

logger = logging.getLogger(__name__)


#: sub-command -> (module of knnlm.analysis, its config class, one-line help)
ANALYSES: dict[str, tuple[str, str, str]] = {
    "frequency": (
        "frequency",
        "FrequencyConfig",
        "word-frequency bins coloured by accumulated loss (Ton et al. Fig. 2)",
    ),
    "clustering": (
        "clustering",
        "ClusteringConfig",
        "GMM log-likelihood of high- vs low-loss tokens (Ton et al. Fig. 3)",
    ),
    "benefit": ("benefit", "BenefitConfig", "which words the kNN part helps, FAISS vs real mask (Xu et al. App. D)"),
    "position": ("position", "PositionConfig", "perplexity by position in the context window (Xu et al. App. E.3)"),
    "stolen": ("stolen", "StolenConfig", "words that can never be the softmax argmax (Xu et al. App. E.4)"),
    "temperature": (
        "temperature",
        "TemperatureConfig",
        "key/query scale and kNN-LM perplexity over a τ grid: is ω's gain a temperature?",
    ),
    "training": ("training", "TrainingConfig", "validation perplexity and key norm by epoch, from fairseq logs"),
}

#: options that hold one value per compared model
LIST_OPTIONS = ("caches", "labels", "valid_caches", "test_caches", "datastores", "checkpoints", "logs")

#: options that name files: made absolute against the launch directory in the hydra app
PATH_OPTIONS = (
    "out",
    "cache",
    "caches",
    "valid_caches",
    "test_caches",
    "datastores",
    "checkpoints",
    "logs",
    "dictionary",
    "data_bin",
    "text",
    "weights",
    "bias",
)


def _module(name: str) -> Any:
    if name not in ANALYSES:
        raise KnnlmError(f"unknown analysis {name!r}; choose one of {', '.join(ANALYSES)}")
    return importlib.import_module(f"knnlm.analysis.{ANALYSES[name][0]}")


def config_class(name: str) -> type:
    """The dataclass holding the options (and their defaults) of analysis ``name``."""
    return getattr(_module(name), ANALYSES[name][1])


def _lambda(value: Any) -> float | str:
    if value == "tune":
        return "tune"
    try:
        return float(value)
    except (TypeError, ValueError):
        raise KnnlmError(f"--lambda {value!r} must be a number in [0, 1] or 'tune'") from None


def build_config(name: str, options: Mapping[str, Any]) -> Any:
    """The config of analysis ``name`` from option values (argparse namespace or hydra config)."""
    cls = config_class(name)
    opts = {k: v for k, v in options.items() if k not in ("analysis", "command", "func", "verbose")}
    if "lambda" in opts:
        opts["lam"] = opts.pop("lambda")
    if "lam" in opts:
        opts["lam"] = _lambda(opts["lam"])
    for key in LIST_OPTIONS:
        if isinstance(opts.get(key), str | Path):
            opts[key] = [opts[key]]  # `caches=DIR` in a hydra config means one cache
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise KnnlmError(f"analysis {name} has no option {', '.join(unknown)}; see `knnlm analyze {name} --help`")
    missing = [f for f, spec in known.items() if spec.default is MISSING and spec.default_factory is MISSING]
    missing = [f for f in missing if opts.get(f) in (None, "???", [])]
    if missing:
        flags = ", ".join("--" + ("cache" if f == "caches" else f.replace("_", "-")) for f in missing)
        raise KnnlmError(f"analysis {name} needs {flags} ({', '.join(missing)}= in a hydra config)")
    return cls(**opts)


def run_analysis(name: str, options: Mapping[str, Any]) -> list[Path]:
    """Run analysis ``name`` with ``options``; returns the files written (PNG, CSV, JSON)."""
    cfg = build_config(name, options)
    return _module(name).run(cfg)


def _default(name: str, option: str) -> Any:
    spec = {f.name: f for f in fields(config_class(name))}[option]
    return spec.default


def _add(parser: argparse.ArgumentParser, analysis: str, flag: str, dest: str, help_text: str, **kw: Any) -> None:
    """An option whose default lives in the analysis' config class (argparse leaves it unset)."""
    default = None if kw.get("required") else _default(analysis, dest)
    if "action" not in kw and default is not None:
        help_text += f" (default: {default})"
    if "type" in kw and "metavar" not in kw:
        kw["metavar"] = "N" if kw["type"] is int else "X"
    parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=help_text, **kw)


def _models_options(parser: argparse.ArgumentParser, analysis: str, max_models: str) -> None:
    _add(
        parser,
        analysis,
        "--cache",
        "caches",
        f"cache folder of one model ({max_models}; repeat)",
        action="append",
        required=True,
        metavar="DIR",
    )
    _add(
        parser,
        analysis,
        "--label",
        "labels",
        "label of each --cache, in order (default: folder names)",
        action="append",
        metavar="TEXT",
    )
    _dictionary_options(parser, analysis)
    _knn_options(parser, analysis, with_mask=True)
    _add(
        parser,
        analysis,
        "--lambda",
        "lam",
        "λ of the interpolation: a number, or 'tune' (on --valid-cache)",
        metavar="L",
    )
    _add(
        parser,
        analysis,
        "--valid-cache",
        "valid_caches",
        "validation cache of each model, for --lambda tune",
        action="append",
        metavar="DIR",
    )


def _dictionary_options(parser: argparse.ArgumentParser, analysis: str) -> None:
    _add(parser, analysis, "--data-bin", "data_bin", "the data-bin folder (its dict.txt, train split)", metavar="DIR")
    _add(parser, analysis, "--dict", "dictionary", "fairseq dict.txt (default: DATA_BIN/dict.txt)", metavar="FILE")


def _knn_options(
    parser: argparse.ArgumentParser, analysis: str, with_mask: bool, with_temperature: bool = True
) -> None:
    if with_mask:
        _add(
            parser, analysis, "--retrieval", "retrieval", "retrieval folder name (overrides the knobs)", metavar="NAME"
        )
    _add(parser, analysis, "--key-type", "key_type", "att | ffn", metavar="KEY")
    _add(parser, analysis, "--similarity", "similarity", "l2 | ip", metavar="SIM")
    if with_mask:
        _add(parser, analysis, "--mask-source", "mask_source", "faiss | real", metavar="SRC")
        _add(parser, analysis, "--score-source", "score_source", "faiss | real", metavar="SRC")
    _add(parser, analysis, "--k", "k", "neighbours kept (<= k_max of the cache)", type=int)
    if with_temperature:
        _add(parser, analysis, "--temperature", "temperature", "softmax temperature τ", type=float)


def _out(parser: argparse.ArgumentParser, analysis: str) -> None:
    _add(parser, analysis, "--out", "out", "output folder", required=True, metavar="DIR")


def _frequency(parser: argparse.ArgumentParser) -> None:
    _models_options(parser, "frequency", "1 to 4, side by side")
    _add(parser, "frequency", "--bins-per-decade", "bins_per_decade", "log bins per factor 10 of frequency", type=int)
    _out(parser, "frequency")


def _clustering(parser: argparse.ArgumentParser) -> None:
    a = "clustering"
    _models_options(parser, a, "1 to 4, side by side")
    _add(parser, a, "--representation", "representation", "att | ffn: the cached queries clustered", metavar="KEY")
    _add(parser, a, "--n-words", "n_words", "most frequent training words used", type=int)
    _add(parser, a, "--max-tokens", "max_tokens", "seeded subsample of their occurrences", type=int)
    _add(parser, a, "--components", "components", "mixture components m", type=int)
    _add(parser, a, "--covariance", "covariance", "full | tied | diag | spherical", metavar="TYPE")
    _add(parser, a, "--per-word", "per_word", "one mixture per word", action="store_true")
    _add(parser, a, "--no-standardize", "standardize", "cluster raw representations", action="store_false")
    _add(parser, a, "--seed", "seed", "seed of the subsample and the mixture", type=int)
    _add(parser, a, "--loss-source", "loss_source", "lm | knn | knnlm: the loss that splits high/low", metavar="SRC")
    _add(parser, a, "--loss-quantile", "loss_quantile", "high loss: above this quantile", type=float)
    _add(parser, a, "--loss-threshold", "loss_threshold", "or above this loss in nats", type=float)
    _add(parser, a, "--bins", "bins", "histogram bins", type=int)
    _out(parser, a)


def _benefit(parser: argparse.ArgumentParser) -> None:
    a = "benefit"
    _add(
        parser,
        a,
        "--cache",
        "cache",
        "cache folder with a FAISS-mask and a real-mask retrieval",
        required=True,
        metavar="DIR",
    )
    _dictionary_options(parser, a)
    _add(
        parser,
        a,
        "--text",
        "text",
        "tokenized training text for the bigram entropies (instead of DATA_BIN)",
        metavar="FILE",
    )
    _add(parser, a, "--train-split", "train_split", "split of DATA_BIN giving the training stream", metavar="NAME")
    _add(parser, a, "--faiss-retrieval", "faiss_retrieval", "FAISS-mask retrieval name", metavar="NAME")
    _add(parser, a, "--real-retrieval", "real_retrieval", "real-mask retrieval name", metavar="NAME")
    _knn_options(parser, a, with_mask=False)
    _add(parser, a, "--min-count", "min_count", "occurrences a word needs in the split", type=int)
    _out(parser, a)


def _position(parser: argparse.ArgumentParser) -> None:
    _models_options(parser, "position", "1 to 4, one plot")
    _add(parser, "position", "--bucket-size", "bucket_size", "positions per bucket", type=int)
    _out(parser, "position")


def _stolen(parser: argparse.ArgumentParser) -> None:
    a = "stolen"
    _add(
        parser,
        a,
        "--weights",
        "weights",
        "fairseq checkpoint (.pt) or V×D .npy softmax matrix",
        required=True,
        metavar="FILE",
    )
    _add(parser, a, "--bias", "bias", "[V] .npy softmax bias (with a .npy matrix)", metavar="FILE")
    _dictionary_options(parser, a)
    _add(parser, a, "--box", "box", "hidden states searched in [-BOX, BOX]^D", type=float)
    _add(parser, a, "--tolerance", "tolerance", "a word must win by more than this many logits", type=float)
    _add(parser, a, "--n-random", "n_random", "random directions of the cheap test", type=int)
    _add(parser, a, "--greedy-steps", "greedy_steps", "subgradient steps before the LP", type=int)
    _add(parser, a, "--lp-constraints", "lp_constraints", "competitors per LP round (at least D + 1)", type=int)
    _add(parser, a, "--max-rounds", "max_rounds", "LP rounds per word", type=int)
    _add(parser, a, "--chunk", "chunk", "words per matrix product", type=int)
    _add(parser, a, "--seed", "seed", "seed of the random directions", type=int)
    _out(parser, a)


def _temperature(parser: argparse.ArgumentParser) -> None:
    a = "temperature"
    _add(
        parser,
        a,
        "--cache",
        "caches",
        "validation cache of one model (repeat)",
        action="append",
        required=True,
        metavar="DIR",
    )
    _add(parser, a, "--label", "labels", "label of each --cache, in order", action="append", metavar="TEXT")
    _add(parser, a, "--test-cache", "test_caches", "test cache of each model, in order", action="append", metavar="DIR")
    _add(parser, a, "--datastore", "datastores", "datastore of each model (mean ‖k‖²)", action="append", metavar="DIR")
    _add(
        parser,
        a,
        "--checkpoint",
        "checkpoints",
        "fairseq checkpoint of each model (weight norms)",
        action="append",
        metavar="FILE",
    )
    _add(
        parser,
        a,
        "--shared-lm-cache",
        "shared_lm_cache",
        "validation cache whose p_LM every model's p_kNN is also mixed with (retrieval alone compared)",
        metavar="DIR",
    )
    _add(parser, a, "--shared-lm-test-cache", "shared_lm_test_cache", "its test cache", metavar="DIR")
    _add(
        parser,
        a,
        "--data-bin",
        "data_bin",
        "with --checkpoint: how much of each LayerNorm's input is one token-independent vector (valid split)",
        metavar="DIR",
    )
    _add(parser, a, "--probe-tokens", "probe_tokens", "valid tokens run for --data-bin", type=int)
    _knn_options(parser, a, with_mask=True, with_temperature=False)  # τ is the swept variable
    _add(parser, a, "--lambda", "lam", "λ: 'tune' (on the validation cache, at each τ) or a number", metavar="L")
    _add(parser, a, "--tau-min", "tau_min", "smallest τ of the geometric grid", type=float)
    _add(parser, a, "--tau-max", "tau_max", "largest τ of the grid", type=float)
    _add(parser, a, "--tau-points", "tau_points", "points of the grid (τ = 1 is added)", type=int)
    _out(parser, a)


def _training(parser: argparse.ArgumentParser) -> None:
    a = "training"
    _add(parser, a, "--log", "logs", "fairseq-train log of one model (repeat)", action="append", required=True,
         metavar="FILE")
    _add(parser, a, "--label", "labels", "label of each --log, in order; seeds of one setting share one",
         action="append", metavar="TEXT")
    _out(parser, a)


_BUILDERS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "frequency": _frequency,
    "clustering": _clustering,
    "benefit": _benefit,
    "position": _position,
    "stolen": _stolen,
    "temperature": _temperature,
    "training": _training,
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``analyze`` sub-command and one sub-command per analysis."""
    parser = subparsers.add_parser(
        "analyze",
        help="analyses and figures: frequency/loss, clustering, benefiting tokens, position, stolen probabilities, "
        "temperature, training curves",
        description="The papers' analyses as PNG figures plus the numbers behind them: OUT/<name>.png, "
        "OUT/<name>.csv and, written last, OUT/<name>.json. See `knnlm analyze ANALYSIS --help`.",
    )
    inner = parser.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    for name, (_, _, help_text) in ANALYSES.items():
        sub = inner.add_parser(name, help=help_text, description=help_text)
        _BUILDERS[name](sub)
        sub.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> None:
    run_analysis(args.analysis, vars(args))


def hydra_app() -> None:
    """``python -m knnlm.cli.analyze --config-name NAME``: the analyses as a hydra app (configs/analyze/)."""
    import hydra
    from hydra.utils import to_absolute_path
    from omegaconf import DictConfig, OmegaConf

    @hydra.main(version_base="1.3", config_path=str(config_dir("analyze")), config_name=None)
    def _main(cfg: DictConfig) -> None:
        options = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(options, dict)
        name = options.pop("analysis", None)
        try:
            if name is None:
                folder = config_dir("analyze")
                raise KnnlmError(f"pass --config-name, one of {', '.join(ANALYSES)} (configs in {folder})")
            for key in PATH_OPTIONS:
                value = options.get(key)
                if isinstance(value, list):
                    options[key] = [to_absolute_path(str(v)) for v in value]
                elif value not in (None, "", "???"):
                    options[key] = to_absolute_path(str(value))
            run_analysis(str(name), options)
        except KnnlmError as err:
            raise SystemExit(f"knnlm analyze: error: {err}") from err

    _main()


if __name__ == "__main__":
    hydra_app()
