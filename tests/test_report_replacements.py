"""Report parts of the datastore replacements: kNN and component lines in one table, figures over n and k."""

from __future__ import annotations

from knnlm.report import parse_line, render_report

from .test_report import PNG_MAGIC, result


def component(metrics: dict, **knobs) -> dict:
    base = {"split": "test", "component": "x", "kind": "learned", "key_type": "att", "n": 1.0, "sizes": "uniform",
            "init": "lm", "loss": "ce", "updates": 100, "lambda": "tune",
            "lambda_grid": {"min": 0.0, "max": 1.0, "n": 101}, "checkpoint": "sha256:m", "labels": {}}
    base.update(knobs)
    values = {"n_tokens": 100, "lm_ppl": 21.75, "component_ppl": 25.0, "component_zero_mass": 0,
              "interp_ppl": 20.0, "interp_zero_mass": 0, "oracle_ppl": 15.0, "lambda_used": 0.3}
    values.update(metrics)
    return {"schema": "knnlm.component/1", "knobs": base, "metrics": values, "provenance": {}}


def lines() -> list:
    records = [
        result({"knn_ppl": "inf", "knn_zero_mass": 7, "interp_ppl": 19.17}),
        component({"component_ppl": 22.58, "interp_ppl": 20.35}, component="learned-att-n1"),
        component({"interp_ppl": 20.1}, component="learned-att-n2", n=2.0),
        component({"interp_ppl": 19.9}, component="learned-att-n3", n=3.0),
        component({"interp_ppl": 21.4}, component="learned-ffn-n1", key_type="ffn"),
        component({"interp_ppl": 20.9}, component="learned-att-n1-interp", loss="interpolated", loss_lambda=0.25),
        component({"interp_ppl": 19.95}, component="adaptive", n=3.0, sizes="frequency"),
    ]
    for k, ppl in ((1, 21.7), (16, 21.5), (1024, 21.6)):
        for t in (1.0, 2.0):
            records.append(component({"interp_ppl": ppl - t / 10}, kind="topk", k=k, temperature=t,
                                     component=f"topk-k{k}-t{t}"))
    return [parse_line(r, f"mem:{i}") for i, r in enumerate(records)]


def test_table2_mixes_knn_and_learned_rows_and_flags_the_missing(tmp_path):
    (t2,) = render_report(lines(), tmp_path, names=["xu2023_table2"])
    rows = {line.split("|")[1].strip() + "/" + line.split("|")[2].strip() + "/" + line.split("|")[3].strip(): line
            for line in t2.markdown.splitlines() if line.startswith("| ") and "---" not in line}
    assert "| 21.75 |" in rows["Base LM/–/–"]
    assert "∞ (7/100 tokens at zero mass)" in rows["kNN-LM/att/datastore"] and "19.17" in rows["kNN-LM/att/datastore"]
    assert "22.58" in rows["learned W_ds/att/V"] and "20.35" in rows["learned W_ds/att/V"]
    assert "19.90" in rows["learned W_ds/att/3V"]
    assert "20.90" not in t2.markdown, "the interpolated-loss head is not a cross-entropy row"
    assert any("ffn / 3V" in m for m in t2.missing) and any("kNN-LM / ffn" in m for m in t2.missing)


def test_figures_3_and_8_are_drawn_from_component_lines(tmp_path):
    out = render_report(lines(), tmp_path, names=["xu2023_figure3", "xu2023_figure8", "xu2023_table6",
                                                  "xu2023_table8"])
    fig3, fig8, t6, t8 = out
    for fig in (fig3, fig8):
        png = [f for f in fig.files if f.suffix == ".png"]
        assert png and png[0].read_bytes()[:8] == PNG_MAGIC
    assert "19.95" in t6.markdown and "19.90" in t6.markdown  # frequency-sized and uniform rows at 3V
    assert "20.90" in t8.markdown and "20.35" in t8.markdown
