"""Rebuild the bundled demo corpus from full WikiText-2 files.

The demo corpus is the leading whole articles of each WikiText-2 split, cut at
the first article boundary after a token budget, stored gzipped. Usage:

    python scripts/make_demo_corpus.py ../shared/data/wikitext-2 knnlm/resources/demo_corpus
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

BUDGET = {"train": 300_000, "valid": 30_000, "test": 30_000}


def is_article_heading(line: str) -> bool:
    return line.startswith(" = ") and not line.startswith(" = = ") and line.endswith(" = ")


def leading_articles(lines: list[str], budget: int) -> list[str]:
    """Lines up to the first article heading once `budget` tokens are reached."""
    tokens = 0
    for i, line in enumerate(lines):
        if tokens >= budget and is_article_heading(line):
            # keep the blank line that precedes a heading with the next article
            return lines[: i - 1]
        tokens += len(line.split()) + 1
    return lines


def main(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for split, budget in BUDGET.items():
        lines = (src / f"wiki.{split}.tokens").read_text(encoding="utf-8").split("\n")[:-1]
        kept = leading_articles(lines, budget)
        data = ("\n".join(kept) + "\n").encode("utf-8")
        with gzip.GzipFile(dst / f"wiki.{split}.tokens.gz", "wb", compresslevel=9, mtime=0) as f:
            f.write(data)
        print(f"{split}: {len(kept)} lines, {sum(len(x.split()) + 1 for x in kept)} tokens")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
