"""`knnlm report`: tables and figures from synthetic result lines; missing settings are flagged, never invented."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from knnlm.cli import main as cli_main
from knnlm.errors import KnnlmError
from knnlm.report import (
    RENDERERS,
    Column,
    RenderContext,
    Row,
    TableSpec,
    best_setting,
    load_results,
    parse_line,
    render_report,
    render_table,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def result(metrics: dict | None = None, **knobs) -> dict:
    """A result line as `knnlm score` writes it, with the paper's default knobs."""
    base = {
        "split": "test",
        "key_type": "att",
        "similarity": "l2",
        "k": 1024,
        "temperature": 1.0,
        "lambda": "tune",
        "lambda_grid": {"min": 0.0, "max": 1.0, "n": 101},
        "mask_source": "faiss",
        "score_source": "faiss",
        "subsample_ratio": 1.0,
        "subsample_seed": None,
        "subsample_method": "none",
        "datastore_subsample": 1.0,
        "datastore_fraction": 1.0,
        "datastore_size": 1000,
        "index": {"factory": "IVF64,PQ8", "nprobe": 8},
        "checkpoint": "sha256:m",
        "labels": {},
    }
    base.update(knobs)
    values = {
        "n_tokens": 100,
        "lm_ppl": 21.75,
        "knn_ppl": 30.0,
        "knn_zero_mass": 0,
        "interp_ppl": 19.17,
        "interp_zero_mass": 0,
        "oracle_ppl": 14.23,
        "lambda_used": 0.25,
    }
    values.update(metrics or {})
    return {"schema": "knnlm.score/1", "knobs": base, "metrics": values, "provenance": {"retrieval": "x"}}


def write_lines(path: Path, records: list[dict]) -> Path:
    with path.open("a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def paper_lines() -> list[dict]:
    lines = [
        result({"knn_ppl": "inf", "knn_zero_mass": 7, "interp_ppl": 19.17}),
        result({"knn_ppl": 31.2, "interp_ppl": 20.5, "lambda_used": 0.3}, similarity="ip"),
        result({"knn_ppl": 40.1, "interp_ppl": 21.0}, key_type="ffn"),
        # ffn/IP deliberately absent
        result({"interp_ppl": 18.9}, score_source="real"),
        result({"interp_ppl": 18.5}, mask_source="real", score_source="real", index=None),
    ]
    for mask in ("faiss", "real"):
        for tau in (0.5, 2.0):  # τ = 1 are the lines above
            lines.append(
                result(
                    {"interp_ppl": 20 + (tau - 1) ** 2},
                    temperature=tau,
                    mask_source=mask,
                    score_source=mask,
                    index=None if mask == "real" else {"factory": "IVF64,PQ8", "nprobe": 8},
                )
            )
        for frac in (0.1, 0.5):
            lines.append(
                result(
                    {"interp_ppl": 20 + 1 / frac},
                    mask_source=mask,
                    score_source=mask,
                    subsample_ratio=frac,
                    subsample_seed=0,
                    subsample_method="score_time_filter",
                    datastore_fraction=frac,
                    index=None if mask == "real" else {"factory": "IVF64,PQ8", "nprobe": 8},
                )
            )
    return lines


@pytest.fixture
def results_file(tmp_path) -> Path:
    return write_lines(tmp_path / "results.jsonl", paper_lines())


def test_tables_render_selected_lines_and_flag_missing(results_file, tmp_path):
    lines = load_results([results_file])
    rendered = {r.name: r for r in render_report(lines, tmp_path / "out")}
    assert set(rendered) == set(RENDERERS)
    table1 = rendered["xu2023_table1"]
    md = table1.markdown
    assert "| Base LM | – | 21.75 | – | – | – |" in md
    assert "| att | L2 | ∞ (7/100 tokens at zero mass) | 19.17 | 14.23 | 0.25 |" in md
    assert "| att | IP | 31.20 | 20.50 | 14.23 | 0.30 |" in md
    assert "| ffn | IP | missing | missing | missing | missing |" in md
    assert table1.missing == [
        "ffn / IP: no line with key_type=ffn, similarity=ip, split=test, k=1024, "
        "temperature=1.0, lambda=tune, datastore_fraction=1.0, mask_source=faiss, "
        "score_source=faiss"
    ]
    table3 = rendered["xu2023_table3"].markdown
    assert "| FAISS mask, real score | 30.00 | 18.90 |" in table3
    assert "| real mask, real score | 30.00 | 18.50 |" in table3
    assert (tmp_path / "out" / "xu2023_table1.md").read_text() == md
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Missing or ambiguous (not filled in):" in report and md in report


def test_figures_are_png_files_with_their_points(results_file, tmp_path):
    rendered = {r.name: r for r in render_report(load_results([results_file]), tmp_path / "out")}
    for name in ("xu2023_figure2_4", "xu2023_figure5"):
        (png,) = rendered[name].files
        assert png == tmp_path / "out" / f"{name}.png"
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
        assert f"]({name}.png)" in rendered[name].markdown
        assert rendered[name].missing == []


def test_figure2_4_draws_rebuilt_datastores_beside_the_score_time_filter(results_file, tmp_path, monkeypatch):
    """Lines of datastores rebuilt with --subsample (scripts/xu2023.sh) make their own series, sharing the
    full-datastore point with the score-time filter's; neither takes the other's points."""
    from knnlm.report import figures

    rebuilt = []
    for mask in ("faiss", "real"):
        for frac, size in ((0.1, 100), (0.25, 250)):
            rebuilt.append(
                result(
                    {"interp_ppl": 30 + 1 / frac},
                    mask_source=mask,
                    score_source=mask,
                    subsample_method="datastore_rebuild",
                    datastore_subsample=frac,
                    datastore_fraction=frac,
                    datastore_size=size,
                    index=None if mask == "real" else {"factory": "IVF8,PQ8", "nprobe": 8},
                )
            )
    write_lines(results_file, rebuilt)
    drawn = {}
    monkeypatch.setattr(figures, "_plot", lambda spec, series, *rest: drawn.update({s.label: p for s, p in series}))
    (figure,) = render_report(load_results([results_file]), tmp_path / "out", names=["xu2023_figure2_4"])
    assert figure.missing == []
    assert drawn["FAISS mask, FAISS score (score-time filter)"] == [(0.1, 30.0), (0.5, 22.0), (1.0, 19.17)]
    assert drawn["FAISS mask, FAISS score (rebuilt datastore)"] == [(0.1, 40.0), (0.25, 34.0), (1.0, 19.17)]
    assert drawn["real mask, real score (rebuilt datastore)"] == [(0.1, 40.0), (0.25, 34.0), (1.0, 18.5)]
    assert "FAISS mask, real score (rebuilt datastore)" not in drawn  # a single point: not a line


def test_empty_figure_is_not_drawn_and_says_so(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", [result(key_type="ffn")])
    rendered = render_report(load_results([path]), tmp_path / "out", names=["xu2023_figure5"])
    assert rendered[0].files == [] and not (tmp_path / "out" / "xu2023_figure5.png").exists()
    assert "Not drawn" in rendered[0].markdown
    assert rendered[0].missing == ["no series 'FAISS mask, FAISS score' (no lines with temperature values for it)"]


def test_strict_refuses_missing_settings(results_file, tmp_path, monkeypatch, capsys):
    with pytest.raises(KnnlmError, match=r"missing or ambiguous.*ffn / IP"):
        render_report(load_results([results_file]), tmp_path / "out", strict=True)
    monkeypatch.setattr(cli_main, "COMMANDS", ["report"])
    assert cli_main.main(["report", str(results_file), "--out", str(tmp_path / "cli"), "--strict"]) == 2
    assert "ffn / IP" in capsys.readouterr().err
    only = ["report", str(results_file), "--out", str(tmp_path / "ok"), "--only", "xu2023_table3,xu2023_figure5"]
    assert cli_main.main([*only, "--strict"]) == 0
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == [
        "report.md",
        "xu2023_figure5.png",
        "xu2023_table3.md",
    ]
    assert cli_main.main(["report", "--list"]) == 0
    assert "xu2023_table1" in capsys.readouterr().out


def test_differing_unfixed_knobs_are_ambiguous_and_reruns_take_the_latest(tmp_path):
    records = [
        result({"interp_ppl": 19.0}),
        result({"interp_ppl": 18.0}),  # a re-run of the same setting: the later line wins
        result({"interp_ppl": 17.0}, similarity="ip", index={"factory": "IVF64,PQ8", "nprobe": 8}),
        result({"interp_ppl": 16.0}, similarity="ip", index={"factory": "IVF64,PQ8", "nprobe": 32}),
    ]
    lines = load_results([write_lines(tmp_path / "r.jsonl", records)])
    out = render_report(lines, tmp_path / "out", names=["xu2023_table1"])[0]
    assert "| att | L2 | 30.00 | 18.00 |" in out.markdown
    assert "| att | IP | ambiguous |" in out.markdown
    assert any("att / IP: 2 lines differ in index.nprobe" in m for m in out.missing)
    fixed = render_report(lines, tmp_path / "out2", names=["xu2023_table1"], where={"index.nprobe": 32})[0]
    assert "| att | IP | 30.00 | 16.00 |" in fixed.markdown


def test_where_changes_the_fixed_knobs(results_file, tmp_path):
    extra = [result({"interp_ppl": 25.0}, split="valid", k=64)]
    lines = load_results([write_lines(results_file, extra)])
    out = render_report(lines, tmp_path / "out", names=["xu2023_table1"], where={"split": "valid", "k": 64})[0]
    assert "| att | L2 | 30.00 | 25.00 |" in out.markdown and "split=valid, k=64" in out.markdown


def test_seed_aggregation_for_later_tables(tmp_path):
    """A spec with aggregate_over renders mean ± std over seeds (the regularized-training tables)."""
    records = [
        result({"interp_ppl": v}, labels={"omega": omega, "seed": seed}, checkpoint=f"ckpt-{omega}-{seed}")
        for omega, values in ((0, (74.0, 74.2)), (1, (70.6, 70.7)))
        for seed, v in zip((1, 2), values, strict=True)
    ]
    lines = load_results([write_lines(tmp_path / "r.jsonl", records)])
    spec = TableSpec(
        name="regularized",
        title="kNN-LM perplexity vs ω",
        label_headers=("ω",),
        rows=(Row(("0",), {"labels.omega": 0}), Row(("1",), {"labels.omega": 1}), Row(("3",), {"labels.omega": 3})),
        columns=(Column("Interp. PPL", "interp_ppl"),),
        aggregate_over=("labels.seed", "checkpoint"),
    )
    out = render_table(spec, lines, RenderContext(tmp_path))
    assert "| 0 | 74.10 ± 0.14 (n=2) |" in out.markdown
    assert "| 1 | 70.65 ± 0.07 (n=2) |" in out.markdown
    assert "| 3 | missing |" in out.markdown and len(out.missing) == 1
    # without aggregation, lines from two seeds are ambiguous rather than averaged silently
    plain = render_table(TableSpec(**{**spec.__dict__, "aggregate_over": ()}), lines, RenderContext(tmp_path))
    assert "| 0 | ambiguous |" in plain.markdown


def test_best_setting_is_the_knob_value_tuned_on_valid(tmp_path, capsys, monkeypatch):
    records = [
        result({"valid_interp_ppl": 130.0}, temperature=1.0, labels={"cache": "full"}),
        result({"valid_interp_ppl": 121.0}, temperature=20.0, labels={"cache": "full"}),
        result({"valid_interp_ppl": 119.0}, temperature=5.0, labels={"cache": "full"}),
        result({"valid_interp_ppl": 125.0}, temperature=5.0, labels={"cache": "full"}),  # a re-run: it counts
        result({"valid_interp_ppl": "inf"}, temperature=0.1, labels={"cache": "full"}),
        result({"valid_interp_ppl": 90.0}, temperature=30.0, labels={"cache": "exact"}),
        result({"valid_interp_ppl": 80.0}, temperature=50.0, similarity="ip", labels={"cache": "full"}),
    ]
    path = write_lines(tmp_path / "r.jsonl", records)
    lines = load_results([path])
    full_l2 = {"labels.cache": "full", "similarity": "l2"}
    assert best_setting(lines, full_l2, "temperature", "valid_interp_ppl") == 20.0
    assert best_setting(lines, {}, "temperature", "valid_interp_ppl") == 50.0
    assert best_setting(lines, full_l2, "temperature", "interp_ppl") == 1.0  # all tie at 19.17: the first read
    assert best_setting(lines, {"split": "valid"}, "temperature", "valid_interp_ppl") is None
    assert best_setting(lines, full_l2, "no_such_knob", "valid_interp_ppl") is None
    monkeypatch.setattr(cli_main, "COMMANDS", ["report"])
    assert cli_main.main(["report", str(path), "--best", "temperature", "--where", "labels.cache=full",
                     "--where", "similarity=l2"]) == 0
    assert capsys.readouterr().out == "20.0\n"
    monkeypatch.setattr(cli_main, "COMMANDS", ["report"])
    assert cli_main.main(["report", str(path), "--best", "temperature", "--where", "split=valid"]) == 0
    assert capsys.readouterr().out == ""


def test_bad_input_is_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"knobs": {}, "metrics": {}}\nnot json\n')
    with pytest.raises(KnnlmError, match="bad.jsonl:2: invalid JSON"):
        load_results([bad])
    with pytest.raises(KnnlmError, match="not a result line"):
        parse_line({"metrics": {}}, "x:1")
    with pytest.raises(KnnlmError, match="does not exist"):
        load_results([tmp_path / "absent.jsonl"])
    with pytest.raises(KnnlmError, match="unknown report part"):
        render_report([parse_line(result(), "x:1")], tmp_path, names=["table9"])
    assert math.isinf(parse_line(result({"knn_ppl": "inf"}), "x:1").metric("knn_ppl"))
