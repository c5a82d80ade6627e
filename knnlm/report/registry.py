"""The registry of report renderers: each table or figure is a function registered by name.

A renderer takes every result line and a :class:`RenderContext`, selects the lines
it needs by their knobs, and returns a :class:`Rendered` with its markdown, the
files it wrote, and what it could not find. Adding a table for a new paper is one
decorated function in a module imported by :mod:`knnlm.report`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knnlm.report.lines import ResultLine


@dataclass(frozen=True)
class RenderContext:
    """Where to write files, and knob constraints the user adds to (or overrides in) every renderer."""

    out_dir: Path
    where: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Rendered:
    """A renderer's output: markdown for report.md, files written, and missing or ambiguous settings."""

    name: str
    title: str
    markdown: str
    files: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


RenderFn = Callable[[Sequence[ResultLine], RenderContext], Rendered]


@dataclass(frozen=True)
class Renderer:
    name: str
    title: str
    kind: str  # "table" | "figure"
    fn: RenderFn


RENDERERS: dict[str, Renderer] = {}


def register(name: str, title: str, kind: str) -> Callable[[RenderFn], RenderFn]:
    """Decorator: make ``fn`` available as ``knnlm report --only name``."""
    if kind not in ("table", "figure"):
        raise ValueError(f"kind must be 'table' or 'figure', got {kind!r}")

    def decorate(fn: RenderFn) -> RenderFn:
        if name in RENDERERS:
            raise ValueError(f"a report renderer named {name!r} is already registered")
        RENDERERS[name] = Renderer(name, title, kind, fn)
        return fn

    return decorate
