"""``knnlm score``: sweep kNN-LM settings over cached splits, one JSON line per setting.

    knnlm score --valid-cache caches/valid --test-cache caches/test --out results.jsonl \\
        [--split test|valid] [--key-type att,ffn] [--similarity l2,ip] [--k 8,64,1024] \\
        [--temperature 0.1:3.0:0.1] [--lambda tune,0.25] [--lambda-grid 0:1:0.01] \\
        [--mask-source faiss,real] [--score-source faiss,real] \\
        [--subsample-ratio 0.1,0.5,1] [--subsample-seed 0] [--label model=wt103 ...] [--skip-missing]

Every knob takes a comma list and ``start:stop:step`` ranges (stop included); the
Cartesian product is scored in-process, reading each memory-mapped retrieval once
per split. The same sweeps run as a hydra app (one job per setting, or lists inside
one job)::

    python -m knnlm.cli.score valid_cache=... test_cache=... out=... 'temperature="0.1:3.0:0.1"'
    python -m knnlm.cli.score --config-name sweep_temperature valid_cache=... test_cache=... out=...
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from knnlm.cli.configs import config_dir
from knnlm.cli.options import key_values
from knnlm.errors import KnnlmError
from knnlm.evaluation.cache import KEY_TYPES, SIMILARITIES, SOURCES, Cache
from knnlm.evaluation.score import SPLITS, TUNE, ScoreSetting, check_settings, expand_grid, score_grid
from knnlm.io import append_jsonl
from knnlm.scoring import DEFAULT_CHUNK_ROWS

logger = logging.getLogger(__name__)


T = TypeVar("T")


def _range(text: str, cast: Callable[[str], T]) -> list[T]:
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(f"range {text!r} must be start:stop:step")
    start, stop, step = (float(p) for p in parts)
    if step <= 0 or stop < start:
        raise ValueError(f"range {text!r} needs step > 0 and stop >= start")
    n = int(round((stop - start) / step))
    if abs(start + n * step - stop) > 1e-9 * max(1.0, abs(stop)):
        raise ValueError(f"range {text!r}: stop is not start plus a whole number of steps")
    return [cast(repr(round(start + i * step, 10))) for i in range(n + 1)]


def _int(text: str) -> int:
    value = float(text)
    if value != int(value):
        raise ValueError(f"{text!r} is not an integer")
    return int(value)


def parse_values(text: str | Sequence[Any] | int | float, cast: Callable[[str], T]) -> list[T]:
    """Parse ``"a,b,start:stop:step"`` (or a list/scalar from a config) into a list of values."""
    if isinstance(text, str):
        items: Iterable[Any] = [item.strip() for item in text.split(",") if item.strip()]
    elif isinstance(text, Sequence):
        items = text
    else:
        items = [text]
    out: list[T] = []
    for item in items:
        if isinstance(item, str) and ":" in item:
            out.extend(_range(item, cast))
        else:
            out.append(cast(str(item)))
    if not out:
        raise ValueError("empty list")
    return out


def _choice(allowed: Sequence[str]) -> Callable[[str], str]:
    def cast(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"{text!r} is not one of {', '.join(allowed)}")
        return text

    return cast


def _lambda(text: str) -> float | str:
    return TUNE if text == TUNE else float(text)


def _option(name: str, value: Any, cast: Callable[[str], T]) -> list[T]:
    try:
        return parse_values(value, cast)
    except ValueError as err:
        raise KnnlmError(f"--{name.replace('_', '-')} {value!r}: {err}") from err


def parse_labels(items: Iterable[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """``KEY=VALUE`` strings (or a mapping) to a dict; numbers stay numbers for grouping in reports."""
    if items is None:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    return key_values(items, "--label", "seed=1")


def build_settings(options: Mapping[str, Any]) -> list[ScoreSetting]:
    """Settings from option values (strings from the command line, or config values)."""
    return expand_grid(
        key_type=_option("key_type", options["key_type"], _choice(KEY_TYPES)),
        similarity=_option("similarity", options["similarity"], _choice(SIMILARITIES)),
        k=_option("k", options["k"], _int),
        temperature=_option("temperature", options["temperature"], float),
        lam=_option("lambda", options["lambda"], _lambda),
        mask_source=_option("mask_source", options["mask_source"], _choice(SOURCES)),
        score_source=_option("score_source", options["score_source"], _choice(SOURCES)),
        subsample_ratio=_option("subsample_ratio", options["subsample_ratio"], float),
        subsample_seed=_option("subsample_seed", options["subsample_seed"], _int),
        split=str(options["split"]),
        lambda_grid=_option("lambda_grid", options["lambda_grid"], float),
    )


def run_score(options: Mapping[str, Any]) -> int:
    """Score the grid described by ``options`` and append the lines to ``options['out']``."""
    if options["split"] not in SPLITS:
        raise KnnlmError(f"--split must be one of {', '.join(SPLITS)}, got {options['split']!r}")
    if Path(options["out"]).is_dir():
        out = options["out"]
        raise KnnlmError(f"--out {out} is a folder; give a results file such as {out}/results.jsonl")
    valid = Cache(options["valid_cache"])
    test = Cache(options["test_cache"]) if options.get("test_cache") else None
    if options["split"] == "test" and test is None:
        raise KnnlmError("--split test needs --test-cache (λ is tuned on --valid-cache, reported on test)")
    if options.get("components"):
        return _score_components(options, valid, test)
    settings = build_settings(options)
    settings, missing = check_settings(valid, test, settings)
    if missing:
        reasons = sorted({reason for _, reason in missing})
        if not options.get("skip_missing"):
            raise KnnlmError(f"{reasons[0]}; dump it, drop it from the sweep, or pass --skip-missing")
        logger.warning("skipping %d of %d settings: %s", len(missing), len(missing) + len(settings), "; ".join(reasons))
    out = Path(options["out"])
    labels = parse_labels(options.get("labels"))
    logger.info("scoring %d settings -> %s", len(settings), out)
    n = 0
    for record in score_grid(
        valid, test, settings, labels=labels, chunk_rows=int(options.get("chunk_rows") or DEFAULT_CHUNK_ROWS)
    ):
        append_jsonl(out, record)
        n += 1
    logger.info("wrote %d lines to %s", n, out)
    return n


def _score_components(options: Mapping[str, Any], valid: Cache, test: Cache | None) -> int:
    """One line per ``--component``, each interpolated with the base LM like a kNN distribution."""
    from knnlm.evaluation.component_score import score_component

    out = Path(options["out"])
    labels = parse_labels(options.get("labels"))
    grid = _option("lambda_grid", options["lambda_grid"], float)
    lams = _option("lambda", options["lambda"], _lambda)
    n = 0
    for name in options["components"]:
        for lam in lams:
            record = score_component(
                valid, test, name, split=str(options["split"]), lam=lam, lambda_grid=grid, labels=labels
            )
            append_jsonl(out, record)
            m = record["metrics"]
            logger.info(
                "%s: component %s, interpolated %s (λ=%s)", name, m["component_ppl"], m["interp_ppl"], m["lambda_used"]
            )
            n += 1
    logger.info("wrote %d lines to %s", n, out)
    return n


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``score`` sub-command."""
    parser = subparsers.add_parser(
        "score",
        help="sweep kNN-LM settings over cached splits into JSON lines",
        description="Compute base LM, kNN-only, interpolated (λ tuned on the validation cache) and oracle "
        "perplexities for every combination of the given knobs, one JSON line per setting. Lists: "
        "'a,b,c' and 'start:stop:step' (stop included).",
    )
    parser.add_argument("--valid-cache", required=True, type=Path, metavar="DIR", help="validation cache")
    parser.add_argument("--test-cache", type=Path, metavar="DIR", help="test cache (needed for --split test)")
    parser.add_argument("--split", default="test", choices=SPLITS, help="split to report on (default test)")
    parser.add_argument("--out", required=True, type=Path, metavar="JSONL", help="results file (appended)")
    parser.add_argument("--key-type", default="att", metavar="LIST", help="att, ffn (default att)")
    parser.add_argument("--similarity", default="l2", metavar="LIST", help="l2, ip (default l2)")
    parser.add_argument("--k", default="1024", metavar="LIST", help="neighbours kept, <= k_max")
    parser.add_argument("--temperature", default="1.0", metavar="LIST", help="softmax temperature τ > 0")
    parser.add_argument(
        "--lambda", dest="lambda_", default=TUNE, metavar="LIST", help="'tune' (on validation) or in [0, 1]"
    )
    parser.add_argument("--lambda-grid", default="0:1:0.01", metavar="LIST", help="λ values tuning tries")
    parser.add_argument("--mask-source", default="faiss", metavar="LIST", help="faiss, real: which neighbours")
    parser.add_argument("--score-source", default="faiss", metavar="LIST", help="faiss, real (their scores)")
    parser.add_argument(
        "--subsample-ratio",
        default="1.0",
        metavar="LIST",
        help="score-time datastore subsampling (approximate; rebuild with --subsample for exact)",
    )
    parser.add_argument("--subsample-seed", default="0", metavar="LIST", help="seed(s) of the subsample")
    parser.add_argument(
        "--label",
        dest="labels",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra knob recorded in every line (e.g. model=wt103, seed=2, omega=1)",
    )
    parser.add_argument(
        "--component",
        dest="components",
        action="append",
        default=[],
        metavar="NAME",
        help="score this parametric component of the caches (`knnlm eval component`) instead of kNN "
        "retrievals; repeatable. Uses --lambda, --lambda-grid, --split and --label only",
    )
    parser.add_argument("--skip-missing", action="store_true", help="skip settings the caches cannot serve")
    parser.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help=argparse.SUPPRESS)
    parser.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> None:
    options = vars(args).copy()
    options["lambda"] = options.pop("lambda_")
    run_score(options)


def hydra_app() -> None:
    """``python -m knnlm.cli.score``: the same scoring as a hydra app (configs/score/)."""
    import hydra
    from hydra.utils import to_absolute_path
    from omegaconf import DictConfig, OmegaConf

    @hydra.main(version_base="1.3", config_path=str(config_dir("score")), config_name="score")
    def _main(cfg: DictConfig) -> None:
        options = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(options, dict)
        for key in ("valid_cache", "test_cache", "out"):
            if options.get(key):
                options[key] = to_absolute_path(str(options[key]))
        try:
            run_score(options)
        except KnnlmError as err:
            raise SystemExit(f"knnlm score: error: {err}") from err

    _main()


if __name__ == "__main__":
    hydra_app()
