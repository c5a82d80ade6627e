"""The documentation: README.md stays short, and every relative link in it and in docs/ resolves.

A link is a markdown ``[text](target)`` (or ``![alt](target)``, or a ``[ref]: target``
definition) outside code. ``http(s)://`` and ``mailto:`` targets are not checked; any
other target must name a file or folder of the repository, relative to the file that
holds the link, and its ``#anchor``, if any, must be a heading of the markdown file it
points to (GitHub's slugs).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_BYTES = 12_000

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) or ![alt](target); text may hold one level of brackets; target may be <...> and have a "title"
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s()]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_EXTERNAL = re.compile(r"^(?:https?://|mailto:)", re.IGNORECASE)
_LINE_ANCHOR = re.compile(r"^L\d+(?:-L\d+)?$")


def doc_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the text outside fenced code blocks."""
    out: list[tuple[int, str]] = []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)[0] * len(match.group(1))
            continue
        if fence is not None:
            if line.strip().startswith(fence) and set(line.strip()) == {fence[0]}:
                fence = None
            continue
        out.append((number, line))
    return out


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link outside code."""
    found: list[tuple[int, str]] = []
    for number, line in prose_lines(text):
        line = _INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line)
        targets = [m.group(1) for m in _LINK.finditer(line)]
        definition = _REF_DEF.match(line)
        if definition:
            targets.append(definition.group(1))
        for target in targets:
            if target.startswith("<") and target.endswith(">"):
                target = target[1:-1]
            found.append((number, target))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text, lowercased, spaces to '-', punctuation other than '-' and '_' dropped."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters (any script), digits and '_'
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a markdown file (repeated slugs get -1, -2, ...)."""
    seen: dict[str, int] = {}
    result: set[str] = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def link_problems(doc: Path, root: Path = ROOT) -> list[str]:
    """Every relative link of ``doc`` that does not resolve, as 'file:line: target (why)'."""
    root, doc = root.resolve(), doc.resolve()
    problems: list[str] = []
    for number, target in links(doc.read_text(encoding="utf-8")):
        if _EXTERNAL.match(target):
            continue
        where = f"{doc.relative_to(root)}:{number}: {target}"
        path_part, _, anchor = target.partition("#")
        path_part = unquote(path_part)
        if path_part.startswith("/"):
            problems.append(f"{where} (absolute path; use a path relative to the file)")
            continue
        resolved = (doc.parent / path_part).resolve() if path_part else doc
        try:
            resolved.relative_to(root)
        except ValueError:
            problems.append(f"{where} (outside the repository)")
            continue
        if not resolved.exists():
            problems.append(f"{where} (no such file or folder)")
            continue
        if not anchor:
            continue
        if resolved.is_file() and resolved.suffix.lower() == ".md":
            if unquote(anchor) not in anchors(resolved):
                problems.append(f"{where} (no heading with anchor #{anchor} in {resolved.relative_to(root)})")
        elif not (resolved.is_file() and _LINE_ANCHOR.match(anchor)):
            problems.append(f"{where} (an anchor on something that is not a markdown file)")
    return problems


def test_readme_is_short() -> None:
    n = len(README.read_bytes())  # bytes, as `wc -c` counts them: ω, τ and ‖ take two or three each
    assert n <= README_MAX_BYTES, f"README.md has {n} bytes; at most {README_MAX_BYTES} (move detail to docs/)"


def test_docs_exist() -> None:
    names = {p.name for p in doc_files()}
    assert {"README.md", "usage.md", "results.md", "architecture.md"} <= names


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    problems = link_problems(doc)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_slugs_follow_github() -> None:
    assert slug("Set-up: two commands") == "set-up-two-commands"
    assert slug("Regularized training (Ton et al., 2022)") == "regularized-training-ton-et-al-2022"
    assert (
        slug("Evaluation in one pass: `fairseq-eval-lm --task knnlm_language_modeling`")
        == "evaluation-in-one-pass-fairseq-eval-lm---task-knnlm_language_modeling"
    )
    assert slug("Why [the link](x.md) ω") == "why-the-link-ω"


def test_the_checker_finds_broken_links(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "exists.py").write_text("", encoding="utf-8")
    (tmp_path / "other.md").write_text("# Title\n\n## A section: here\n", encoding="utf-8")
    doc = tmp_path / "docs" / "page.md"
    doc.write_text(
        "# Page\n\n"
        "[ok](../exists.py) [ok](../other.md#a-section-here) [ok](#page) [ok](https://example.org/x)\n"
        "[missing](../nope.md) [wrong anchor](../other.md#nothing) [no heading](#absent)\n"
        "`[in code](../nope.md)`\n\n```\n[in a fence](../nope.md)\n```\n"
        "[not from the root](exists.py)\n",
        encoding="utf-8",
    )
    problems = link_problems(doc, root=tmp_path)
    assert [p.split(": ", 1)[1].split(" (")[0] for p in problems] == [
        "../nope.md",
        "../other.md#nothing",
        "#absent",
        "exists.py",
    ], problems
