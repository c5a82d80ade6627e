"""Xu, Alon & Neubig (2023), Section 4 and Appendices C/E: trainable replacements of the datastore.

Rows mix kNN-LM score lines (``knnlm.score/1``) with component lines
(``knnlm.component/1``, see :mod:`knnlm.evaluation.component_score`); the "PPL"
column is the kNN or the component distribution alone. λ is tuned on validation
and results are reported on test, as everywhere in :mod:`knnlm.report.xu2023`.
"""

from __future__ import annotations

from knnlm.report.figures import FigureSpec, Series, figure_renderer
from knnlm.report.tables import Column, Row, TableSpec, table_renderer

FIXED = {"split": "test", "lambda": "tune"}
KNN = {"similarity": "l2", "k": 1024, "temperature": 1.0, "mask_source": "faiss", "score_source": "faiss",
       "datastore_fraction": 1.0}
LEARNED = {"kind": "learned", "sizes": "uniform", "loss": "ce"}

COLUMNS = (
    Column("PPL", "component_ppl|knn_ppl", zero_mass="component_zero_mass|knn_zero_mass"),
    Column("Interp. PPL", "interp_ppl"),
    Column("Oracle", "oracle_ppl"),
    Column("λ", "lambda_used"),
)


def _learned(key: str, n: int, **extra) -> dict:
    return {**LEARNED, "key_type": key, "n": float(n), **extra}


TABLE2 = TableSpec(
    name="xu2023_table2",
    title="Table 2: the datastore replaced by a trained W_ds (softmax over nV rows, summed per word)",
    label_headers=("Model", "h_ds", "N_ds"),
    rows=(
        Row(("kNN-LM", "att", "datastore"), {**KNN, "key_type": "att"}),
        Row(("kNN-LM", "ffn", "datastore"), {**KNN, "key_type": "ffn"}),
        Row(("learned W_ds", "att", "V"), _learned("att", 1)),
        Row(("learned W_ds", "att", "3V"), _learned("att", 3)),
        Row(("learned W_ds", "ffn", "V"), _learned("ffn", 1)),
        Row(("learned W_ds", "ffn", "3V"), _learned("ffn", 3)),
    ),
    columns=COLUMNS,
    fixed=FIXED,
    base_lm=Column("PPL", "lm_ppl"),
    note="kNN-LM rows: L2, k=1024, τ=1, FAISS mask and score, full datastore. Learned rows: the base LM is "
    "frozen; W_ds is trained with cross-entropy on its att or ffn representation.",
)

TABLE5 = TableSpec(
    name="xu2023_table5",
    title="Table 5: learned W_ds of nV x D rows, n = 1…9 (the numbers behind Figure 3)",
    label_headers=("h_ds", "n"),
    rows=tuple(Row((key, str(n)), _learned(key, n)) for key in ("att", "ffn") for n in range(1, 10)),
    columns=COLUMNS,
    fixed=FIXED,
    base_lm=Column("PPL", "lm_ppl"),
)

TABLE6 = TableSpec(
    name="xu2023_table6",
    title="Table 6: adaptive numbers of embeddings per word, 1 + log_b f_v (total nV)",
    label_headers=("h_ds", "sizes"),
    rows=tuple(
        Row((key, label), {"kind": "learned", "loss": "ce", "key_type": key, "sizes": sizes})
        for key in ("att", "ffn")
        for sizes, label in (("uniform", "uniform n"), ("frequency", "by frequency"), ("loss", "by training loss"))
    ),
    columns=COLUMNS,
    fixed={**FIXED, "n": 3.0},
    base_lm=Column("PPL", "lm_ppl"),
    note="Same total number of rows (3V) in every row.",
)

TABLE7 = TableSpec(
    name="xu2023_table7",
    title="Table 7: mixture of softmaxes over the output embeddings W_sm",
    label_headers=("h_ds", "R", "W_sm"),
    rows=tuple(
        Row((key, str(r), label), {"kind": "mos", "key_type": key, "components": r, "train_output": train})
        for key in ("att", "ffn")
        for r in (2, 3)
        for train, label in ((False, "frozen"), (True, "fine-tuned"))
    ),
    columns=COLUMNS,
    fixed=FIXED,
    base_lm=Column("PPL", "lm_ppl"),
)

TABLE8 = TableSpec(
    name="xu2023_table8",
    title="Table 8: training objectives of W_ds (att, V rows): cross-entropy, interpolated loss (Eq. 12), "
    "distillation from the base LM; and the clustered datastore (Appendix C.3)",
    label_headers=("Model", "objective"),
    rows=(
        Row(("learned W_ds", "cross-entropy"), _learned("att", 1)),
        Row(("learned W_ds", "interpolated, λ=0.25"), {**_learned("att", 1), "loss": "interpolated"}),
        Row(("learned W_ds", "soft labels (distill)"), {**_learned("att", 1), "loss": "distill"}),
        Row(("clustered datastore", "k-means only"), {"kind": "clusters", "key_type": "att", "train_centroids": False}),
        Row(("clustered datastore", "fine-tuned centroids"),
            {"kind": "clusters", "key_type": "att", "train_centroids": True}),
    ),
    columns=COLUMNS,
    fixed=FIXED,
    base_lm=Column("PPL", "lm_ppl"),
)

TABLE9 = TableSpec(
    name="xu2023_table9",
    title="Table 9: other parametric companions of the base LM (Appendix E)",
    label_headers=("Second distribution",),
    rows=(
        Row(("kNN-LM (att)",), {**KNN, "key_type": "att"}),
        Row(("LM trained from another seed (ensemble)",), {"kind": "lm", "component": "ensemble-seed2"}),
        Row(("overfitted continuation, no dropout",), {"kind": "lm", "component": "overfit"}),
        Row(("base LM, top-k=1024, τ=1",), {"kind": "topk", "k": 1024, "temperature": 1.0}),
    ),
    columns=COLUMNS,
    fixed=FIXED,
    base_lm=Column("PPL", "lm_ppl"),
)

FIGURE3 = FigureSpec(
    name="xu2023_figure3",
    title="Figure 3: interpolated perplexity vs the number of rows per word of a learned W_ds",
    x="n",
    y="interp_ppl",
    xlabel="Rows per word n (W_ds is nV x D)",
    ylabel="Interpolated perplexity",
    series=tuple(Series(f"learned W_ds, {key}", {**LEARNED, "key_type": key}) for key in ("att", "ffn")),
    fixed=FIXED,
    expect=("learned W_ds",),
    logx=False,
)

FIGURE8 = FigureSpec(
    name="xu2023_figure8",
    title="Figure 8: the base LM's own distribution cut to its top k words, with temperature τ, interpolated "
    "with the base LM",
    x="k",
    y="interp_ppl",
    xlabel="k (words kept)",
    ylabel="Interpolated perplexity",
    series=tuple(Series(f"τ = {t:g}", {"kind": "topk", "temperature": t}) for t in (1.0, 2.0, 3.0, 5.0)),
    fixed=FIXED,
    expect=("τ",),
    logx=True,
)

for _spec in (TABLE2, TABLE5, TABLE6, TABLE7, TABLE8, TABLE9):
    table_renderer(_spec)
figure_renderer(FIGURE3)
figure_renderer(FIGURE8)
