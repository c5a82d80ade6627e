"""Command-line options generated from the dataclass configs, so that each option is declared once.

The dataclass of a job (``DatastoreBuildConfig``, ``IndexBuildConfig``, ``LMDumpConfig``,
``RetrievalConfig``) is also its hydra schema; its fields carry their help text in
``metadata["help"]``. :func:`add_config_arguments` turns every field into ``--field-name``
(type, default, ``required`` for omegaconf's ``MISSING``, ``store_true`` for flags,
``--x/--no-x`` for optional booleans, comma-separated lists) and :func:`config_from_args`
builds the dataclass back from the parsed namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from knnlm.errors import KnnlmError

Config = TypeVar("Config")

_MISSING_VALUE = "???"  # omegaconf.MISSING: a field the user must give
_METAVARS = {int: "N", float: "X"}  # strings keep argparse's own (the option's name in capitals)


def _unwrap_optional(hint: Any) -> Any:
    """``T`` of ``Optional[T]`` / ``T | None``; other hints unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def comma_list(text: str) -> list[str]:
    """``a,b`` -> ``["a", "b"]`` (empty items dropped)."""
    return [item.strip() for item in str(text).split(",") if item.strip()]


def key_values(items: Iterable[str], option: str, example: str) -> dict[str, Any]:
    """``KEY=VALUE`` strings to a dict; values are JSON when they parse (numbers, null), else text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise KnnlmError(f"{option} {item!r} must be KEY=VALUE (e.g. {example})")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return _MISSING_VALUE


def add_config_arguments(
    parser: argparse.ArgumentParser,
    config: type,
    *,
    skip: Iterable[str] = (),
    choices: Mapping[str, Iterable[str]] | None = None,
    metavars: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """One ``--option`` per field of ``config`` (except ``skip``), help from the field's metadata.

    ``defaults`` gives a command-line default to fields the dataclass requires (``--checkpoint``
    may be left out when ``--hf-model`` is given).
    """
    hints = typing.get_type_hints(config)
    choices, metavars, defaults = dict(choices or {}), dict(metavars or {}), dict(defaults or {})
    for field in dataclasses.fields(config):
        if field.name in skip:
            continue
        hint = _unwrap_optional(hints[field.name])
        default = defaults[field.name] if field.name in defaults else _default(field)
        kwargs: dict[str, Any] = {"dest": field.name, "help": field.metadata.get("help")}
        if hint is bool and default is None:
            kwargs.update(action=argparse.BooleanOptionalAction, default=None)
        elif hint is bool:
            kwargs.update(action="store_true", default=bool(default))
        else:
            if typing.get_origin(hint) is list:
                kwargs.update(type=comma_list, metavar=metavars.get(field.name, "A,B"))
            else:
                kwargs["type"] = hint
                if field.name in metavars or hint in _METAVARS:
                    kwargs["metavar"] = metavars.get(field.name, _METAVARS.get(hint))
            if field.name in choices:
                kwargs["choices"] = list(choices[field.name])
                kwargs.pop("metavar", None)
            if default == _MISSING_VALUE:
                kwargs["required"] = True
            else:
                kwargs["default"] = default
                help_text = kwargs["help"] or ""
                if default is not None and "default" not in help_text:
                    shown = ",".join(default) if isinstance(default, list) else default
                    kwargs["help"] = f"{help_text} (default: {shown})".strip()
        parser.add_argument("--" + field.name.replace("_", "-"), **kwargs)


def config_from_args(config: type[Config], args: argparse.Namespace, **overrides: Any) -> Config:
    """The ``config`` dataclass of parsed arguments (fields absent from ``args`` keep their defaults)."""
    names = {f.name for f in dataclasses.fields(config)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return config(**values)
