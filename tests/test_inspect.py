"""``knnlm inspect``: the right neighbours, masses and contexts, checked against references computed here.

The artifacts are tiny (the test checkpoint, a datastore of the train slice, an exact-search
retrieval for the first tokens of valid); the references are brute force in float64 and the
corpus text read straight from the raw files, not through the code under test.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from knnlm.cli.main import main

TPS, CW, K_MAX, LIMIT = 48, 16, 16, 200
KNOBS = ["--mask-source", "real", "--score-source", "real", "--lambda", "0.25"]


@pytest.fixture(scope="module")
def art(tiny_checkpoint, tiny_data_bin, tmp_path_factory):
    """A datastore of the train split, a cache of valid with exact neighbours, and the raw words of both splits."""
    from knnlm.datastore import DatastoreBuildConfig, build_datastore
    from knnlm.evaluation.dump import LMDumpConfig, RetrievalConfig, dump_lm, dump_retrieval

    root = tmp_path_factory.mktemp("inspect")
    common = {"tokens_per_sample": TPS, "context_window": CW, "max_tokens": 512, "device": "cpu"}
    (store,) = build_datastore(DatastoreBuildConfig(checkpoint=str(tiny_checkpoint), data=str(tiny_data_bin),
                                                    out=str(root / "ds"), key_types=["att"], **common))
    dump_lm(LMDumpConfig(checkpoint=str(tiny_checkpoint), data=str(tiny_data_bin), out=str(root / "cache"),
                         split="valid", limit_tokens=LIMIT, **common))
    dump_retrieval(RetrievalConfig(cache=str(root / "cache"), datastore=str(store), similarity="l2", k_max=K_MAX,
                                   device="cpu"))
    return {"root": root, "store": Path(store), "cache": root / "cache", "data": tiny_data_bin}


def raw_words(text_slice: Path, split: str) -> list[str]:
    """The split as fairseq binarizes it: each line's whitespace-separated words, then </s>."""
    words: list[str] = []
    for line in (text_slice / f"wiki.{split}.tokens").read_text(encoding="utf-8").splitlines():
        words += [*line.split(), "</s>"]
    return words


def brute_force(art, position: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores (−‖q−k‖², float64) of every datastore entry for the cached query, and the ranking."""
    from knnlm.datastore import Datastore

    store = Datastore.open(art["store"])
    query = np.load(art["cache"] / "query_att.npy")[position].astype(np.float64)
    scores = -((np.asarray(store.keys, dtype=np.float64) - query) ** 2).sum(axis=1)
    return scores, np.argsort(-scores, kind="stable")


def inspector(art, **kwargs):
    from knnlm.evaluation.cache import Cache
    from knnlm.evaluation.inspection import Inspector
    from knnlm.evaluation.score import ScoreSetting

    setting = ScoreSetting(k=kwargs.pop("k", 8), temperature=kwargs.pop("temperature", 3.0), lam=0.25,
                           mask_source="real", score_source="real")
    return Inspector(Cache(art["cache"]), setting, **kwargs)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_table_lists_the_exact_neighbours_in_order(art, capsys):
    position = 57
    code, out, _ = run(capsys, "inspect", "--cache", str(art["cache"]), "--position", str(position), "--k", "8",
                       "--top", "6", *KNOBS)
    assert code == 0
    assert all(len(line) <= 120 for line in out.splitlines())
    assert "\033[" not in out  # not a tty: no colours
    rows = [m.groups() for m in re.finditer(r"^\s+(\d+)\s+(-?\d+\.\d{4})\s+(\d\.\d{4})\s+(\S+)", out, re.M)][:6]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5, 6]
    scores, order = brute_force(art, position)
    from knnlm.datastore import Datastore

    vals = np.asarray(Datastore.open(art["store"]).vals)
    from knnlm.evaluation.inspection import load_dictionary

    symbols = load_dictionary(art["data"]).symbols
    shown = np.array([float(r[1]) for r in rows])
    np.testing.assert_allclose(shown, scores[order[:6]], rtol=1e-4, atol=1e-3)
    for rank, row in enumerate(rows):
        tied = np.flatnonzero(np.abs(scores - scores[order[rank]]) < 1e-3)
        assert row[3] in {symbols[vals[i]][:13] for i in tied}, (rank, row)


def test_mass_per_value_is_the_float64_softmax_summed_per_value(art):
    view = inspector(art, k=8, temperature=3.0).token(31, top=8)
    from knnlm.evaluation.cache import Cache

    retrieval = Cache(art["cache"]).find("att", "l2", "real", "real")
    s = np.asarray(retrieval.scores[31, :8], dtype=np.float64)
    v = np.asarray(retrieval.vals[31, :8])
    w = np.exp((s - s.max()) / 3.0)
    w /= w.sum()
    reference = {int(value): float(w[v == value].sum()) for value in np.unique(v)}
    got = {m.value: m.mass for m in view.masses}
    assert got.keys() == reference.keys()
    assert sum(got.values()) == pytest.approx(1.0, abs=1e-12)
    for value, mass in reference.items():
        assert got[value] == pytest.approx(mass, rel=1e-9, abs=1e-15)
    assert [m.mass for m in view.masses] == sorted((m.mass for m in view.masses), reverse=True)
    np.testing.assert_allclose([n.weight for n in view.neighbours], w, rtol=1e-9)
    p = view.probabilities
    assert p["knn"] == pytest.approx(reference.get(view.target, 0.0), rel=1e-9, abs=1e-300)
    assert p["interp"] == pytest.approx(0.75 * p["lm"] + 0.25 * p["knn"], rel=1e-9)


def test_contexts_are_the_words_before_the_entries(art, text_slice):
    from knnlm.evaluation.inspection import load_dictionary

    train, valid = raw_words(text_slice, "train"), raw_words(text_slice, "valid")
    known = set(load_dictionary(art["data"]).symbols)
    view = inspector(art, context_words=7).token(40, top=8)
    assert not view.notes
    expected_query = [w if w in known else "<unk>" for w in valid[33:40]]
    assert view.context == expected_query
    for n in view.neighbours:
        assert n.context == train[max(0, n.row - 7) : n.row]  # rows are the train stream's positions
        assert n.value_text == train[n.row]
        assert n.is_target == (n.value == view.target)


def test_old_datastore_without_its_split_still_shows_scores(art, tmp_path):
    """A datastore that records no source split: a note says why, scores and values stay."""
    from knnlm.datastore import Datastore, write_datastore
    from knnlm.evaluation.dump import RetrievalConfig, dump_retrieval

    real = Datastore.open(art["store"])
    source = {k: v for k, v in real.meta["source"].items() if k not in ("split", "data_sha256")}
    bare = write_datastore(tmp_path / "bare", np.asarray(real.keys), np.asarray(real.vals), key_type="att",
                           source=source)
    cache = tmp_path / "cache"
    shutil.copytree(art["cache"], cache, ignore=shutil.ignore_patterns("knn"))
    meta = json.loads((cache / "meta.json").read_text())
    (cache / "meta.json").write_text(json.dumps({**meta, "retrievals": []}))
    dump_retrieval(RetrievalConfig(cache=str(cache), datastore=str(bare.path), similarity="l2", k_max=8, device="cpu"))
    view = inspector({**art, "cache": cache}).token(40, top=4)
    assert any("rebuild the datastore with `knnlm datastore build`" in note for note in view.notes)
    assert all(n.context is None for n in view.neighbours)
    assert len(view.neighbours) == 4 and all(n.value_text for n in view.neighbours)


def test_word_occurrences(art, capsys):
    ins = inspector(art)
    first, *_ = ins.positions_of_word("</s>", None)
    assert ins.positions_of_word("</s>", 1) == [first]
    code, out, _ = run(capsys, "inspect", "--cache", str(art["cache"]), "--word", "</s>", "--occurrence", "all",
                       "--k", "4", "--top", "2", *KNOBS)
    assert code == 0
    assert out.count("target   </s>") == len(ins.positions_of_word("</s>", None)) > 1


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.marks: list[tuple[str, str]] = []
        self._mark: str | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "mark":
            self._mark = dict(attrs).get("class") or ""

    def handle_data(self, data):
        if self._mark is not None:
            self.marks.append((self._mark, data))
            self._mark = None


def test_html_page_is_self_contained_escaped_and_highlights_values(art, tmp_path, capsys):
    out = tmp_path / "token.html"
    code, _, _ = run(capsys, "inspect", "--cache", str(art["cache"]), "--position", "40", "--k", "8",
                     "--html", str(out), *KNOBS)
    assert code == 0
    page = _Page()
    page.feed(out.read_text(encoding="utf-8"))
    page.close()
    assert not [t for t, a in page.tags if t in ("script", "link", "img", "iframe")]
    assert not [a for _, attrs in page.tags for k, a in attrs.items() if k in ("src", "href")]
    view = inspector(art).token(40, top=10)
    assert ("target", view.target_text) in page.marks
    for n in view.neighbours:
        assert ("hit" if n.is_target else "miss", n.value_text) in page.marks

    from knnlm.report.inspection import render_html, render_text

    evil = "<script>alert(1)</script>"
    neighbour = dataclasses.replace(view.neighbours[0], value_text=evil, context=["a", evil], is_target=True)
    hostile = dataclasses.replace(view, target_text=evil, context=[evil], neighbours=[neighbour])
    text = render_html([hostile])
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    page = _Page()
    page.feed(text)
    assert ("hit", evil) in page.marks and ("target", evil) in page.marks
    assert all(len(line) <= 120 for line in render_text([hostile]).splitlines())
    assert "\033[32m" in render_text([hostile], color=True)


def test_a_word_that_is_never_a_target_is_refused(art):
    from knnlm.errors import KnnlmError

    ins = inspector(art)
    targets = set(np.load(art["cache"] / "targets.npy").tolist())
    absent = next(w for i, w in enumerate(ins.symbols) if i not in targets and i > 3)
    with pytest.raises(KnnlmError, match=rf"--word '{re.escape(absent)}' is never a target in .* \(200 tokens\)"):
        ins.positions_of_word(absent, 1)


def test_a_prompt_is_inspected_like_the_same_words_of_a_cache(art, text_slice, tiny_checkpoint, capsys):
    """The first 20 words of valid as a prompt: its last word gets the neighbours cache token 19 got."""
    words = raw_words(text_slice, "valid")[:20]
    code, out, _ = run(capsys, "inspect", "--prompt", " ".join(words), "--checkpoint", str(tiny_checkpoint),
                       "--data", str(art["data"]), "--datastore", str(art["store"]), "--similarity", "l2",
                       "--k", "8", "--top", "8", "--lambda", "0.25")
    assert code == 0
    assert "token 19 of 20" in out and f"target   {words[-1]} " in out
    prompt_scores = [float(m) for m in re.findall(r"^\s+\d+\s+(-?\d+\.\d{4})\s", out, re.M)]
    view = inspector(art).token(19, top=8)
    np.testing.assert_allclose(prompt_scores, [n.score for n in view.neighbours], rtol=1e-4, atol=2e-3)
    assert " ".join(words[8:19]) in out  # the prompt's own words are the query's context
