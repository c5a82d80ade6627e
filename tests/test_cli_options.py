"""The generated options: one per config field, with the field's type, default and help; round trip to the config."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from knnlm.cli.main import build_parser
from knnlm.cli.options import add_config_arguments, config_from_args, key_values
from knnlm.datastore.build import DatastoreBuildConfig
from knnlm.datastore.index import IndexBuildConfig
from knnlm.errors import KnnlmError
from knnlm.evaluation.dump import LMDumpConfig, RetrievalConfig


@pytest.mark.parametrize("config", [DatastoreBuildConfig, IndexBuildConfig, LMDumpConfig, RetrievalConfig])
def test_every_field_has_help(config):
    assert all(f.metadata.get("help") for f in dataclasses.fields(config)), config


def test_defaults_round_trip_and_types_parse():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, DatastoreBuildConfig)
    args = parser.parse_args(["--data", "d", "--out", "o", "--key-types", "ffn", "--subsample", "0.5", "--no-fp16",
                              "--tokens-per-sample", "64"])
    cfg = config_from_args(DatastoreBuildConfig, args)
    assert cfg == DatastoreBuildConfig(data="d", out="o", key_types=["ffn"], subsample=0.5, fp16=False,
                                       tokens_per_sample=64)
    assert config_from_args(DatastoreBuildConfig, parser.parse_args(["--data", "d", "--out", "o"])) == (
        DatastoreBuildConfig(data="d", out="o"))
    with pytest.raises(SystemExit):  # --data is required (omegaconf MISSING)
        parser.parse_args(["--out", "o"])


def test_the_cli_options_are_the_configs_fields():
    parser = build_parser()
    sub = {a.dest: a for a in parser._subparsers._group_actions}["command"].choices  # noqa: SLF001

    def options(*path):
        p = sub[path[0]]
        for name in path[1:]:
            p = {a.dest: a for a in p._subparsers._group_actions}[next(iter(  # noqa: SLF001
                a.dest for a in p._subparsers._group_actions))].choices[name]  # noqa: SLF001
        return {a.dest for a in p._actions if a.option_strings and a.dest != "help"}

    assert options("datastore", "build") == {f.name for f in dataclasses.fields(DatastoreBuildConfig)}
    assert options("eval", "dump") == {f.name for f in dataclasses.fields(LMDumpConfig)}
    assert options("eval", "retrieve") == {f.name for f in dataclasses.fields(RetrievalConfig)}
    assert options("index", "build") == {f.name for f in dataclasses.fields(IndexBuildConfig)} - {"train_only"}


def test_key_values_keep_numbers_and_null_and_name_the_option_of_a_bad_item():
    assert key_values(["seed=1", "tau=0.5", "cache=full", "x=null", "eq=a=b"], "--label", "seed=1") == {
        "seed": 1, "tau": 0.5, "cache": "full", "x": None, "eq": "a=b"}
    for bad in ("seed", "=1"):
        with pytest.raises(KnnlmError, match=r"--where '.*' must be KEY=VALUE \(e\.g\. split=valid\)"):
            key_values([bad], "--where", "split=valid")


@dataclasses.dataclass
class _Job:
    size: int = 1
    name: str = "x"


def test_a_schema_app_takes_key_value_overrides_and_turns_errors_into_status_2(tmp_path, monkeypatch, capsys):
    from knnlm.cli.configs import run_schema_app

    monkeypatch.chdir(tmp_path)  # hydra writes its outputs/ folder here
    monkeypatch.setattr("sys.argv", ["app", "size=3", "name=y"])
    assert run_schema_app("schema_app_test", _Job, lambda cfg: f"{cfg.name}:{cfg.size * 2}", "knnlm job") == 0
    assert capsys.readouterr().out.strip().endswith("y:6")

    def fails(cfg: _Job) -> str:
        raise KnnlmError(f"size {cfg.size} is too small")

    monkeypatch.setattr("sys.argv", ["app", "size=0"])
    assert run_schema_app("schema_app_test", _Job, fails, "knnlm job") == 2
    assert "knnlm job: error: size 0 is too small" in capsys.readouterr().err
