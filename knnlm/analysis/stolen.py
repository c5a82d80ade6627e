"""Stolen probabilities (Xu et al. 2023, Appendix E.4): can every word be the softmax's argmax?

With output embeddings ``W`` (V×D) and bias ``b``, word ``v`` is *argmaxable* iff some
hidden state ``h`` makes it win outright::

    ∃ h : (w_v − w_u)·h + (b_v − b_u) > 0   for all u ≠ v.

Without bias this says ``w_v`` is a vertex of the convex hull of the rows of ``W``; a
word strictly inside the hull can never be predicted by greedy decoding, whatever
the context ("stolen probabilities"). Here ``h`` is limited to the box
``[−B, B]^D`` and a word counts as argmaxable when it can win by more than a
tolerance (in logits). The box does not matter without bias (the condition is
scale-free); with a bias it rules out arbitrarily long hidden states.

The exact test is a linear program per word (maximize the margin ``t ≤ 1`` over
``h`` in the box); 33K LPs with 33K constraints each would take hours, so cheaper
tests go first and only the words they cannot certify reach the LP:

1. ``self``: ``h = w_v − mean(W)`` (scaled into the box), one matrix product per chunk
   of words, screened in float32 with a rounding-error bound;
2. ``random``: random Gaussian directions and the ±coordinate axes; the winner of
   each direction is argmaxable (the word furthest along a direction is a hull vertex);
3. ``greedy``: projected subgradient ascent on the margin ``min_u (w_v − w_u)·h + b_v − b_u``
   from ``h = w_v``, in float64;
4. ``lp``: the LP by constraint generation (scipy's HiGHS): solve with the strongest
   competitors only, add every competitor the solution violates, repeat. A relaxed
   optimum ``t ≤ tol`` proves the word un-argmaxable (the relaxation can only be
   larger); an ``h`` that beats all V−1 competitors proves it argmaxable.

This applies to a plain softmax head. An adaptive softmax scores words through a
head and tail clusters with their own projections, so there is no single ``W``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linprog

from knnlm.errors import KnnlmError

from .outputs import write_csv, write_json
from .plots import PAIR_COLOURS, new_figure, paper_style, save_figure
from .vocab import Vocabulary, read_dictionary, resolve_dictionary

logger = logging.getLogger(__name__)

NAME = "stolen_probabilities"
STAGES = ("self", "random", "greedy", "lp", "undecided")
_EPS32 = float(np.finfo(np.float32).eps)


@dataclass(kw_only=True)
class StolenConfig:
    """``knnlm analyze stolen``: the options (defaults shared with configs/analyze/stolen.yaml)."""

    out: str | Path
    weights: str | Path  # a fairseq checkpoint (.pt) or a V×D .npy matrix
    bias: str | Path | None = None  # a [V] .npy bias (with a .npy matrix)
    dictionary: str | Path | None = None  # dict.txt, to name the words (optional)
    data_bin: str | Path | None = None
    box: float = 1.0  # h is searched in [-box, box]^D
    tolerance: float = 1e-6  # a word must win by more than this (logits)
    n_random: int = 1024  # random directions of the cheap test
    greedy_steps: int = 50
    lp_constraints: int = 64  # competitors added per LP round (at least D + 1 are used)
    max_rounds: int = 100  # LP rounds per word before it is reported undecided
    chunk: int = 1024  # words per matrix product
    seed: int = 0


@dataclass
class ArgmaxReport:
    """Per word: argmaxable or not, which test decided, and the margin found (logits, h in the box)."""

    argmaxable: np.ndarray  # bool [V]
    stage: np.ndarray  # int8 [V], index into STAGES
    margin: np.ndarray  # float64 [V]: the winning margin certified, or the LP optimum when not argmaxable
    box: float
    tolerance: float
    lp_solves: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def n_lp(self) -> int:
        """Words that needed the LP (decided by it or left undecided)."""
        return int(np.count_nonzero(self.stage >= STAGES.index("lp")))

    def counts(self) -> dict[str, int]:
        """How many words each test decided."""
        return {name: int(np.count_nonzero(self.stage == i)) for i, name in enumerate(STAGES)}


def _to_box(h: np.ndarray, box: float) -> np.ndarray:
    """Scale each row so that its largest coordinate is ±box (zero rows stay zero)."""
    top = np.abs(h).max(axis=1, keepdims=True)
    return np.where(top > 0, h * (box / np.where(top > 0, top, 1.0)), 0.0)


class _Scorer:
    """Logits ``H·Wᵀ + b`` in float32 with a bound on their rounding error, for cheap certificates."""

    def __init__(self, w: np.ndarray, b: np.ndarray, box: float) -> None:
        self.w32 = np.ascontiguousarray(w, dtype=np.float32)
        self.b32 = b.astype(np.float32)
        dim = w.shape[1]
        # |logit error| ≤ (D + 2)·eps·(Σ_i |w_ui|·|h_i| + |b_u|) for float32 products, sums and inputs;
        # a margin is a difference of two logits, hence the factor 2
        worst = float(np.abs(w).sum(axis=1).max(initial=0.0)) * box + float(np.abs(b).max(initial=0.0))
        self.error = 2.0 * (dim + 2) * _EPS32 * worst

    def logits(self, h: np.ndarray) -> np.ndarray:
        out = h.astype(np.float32) @ self.w32.T
        out += self.b32
        return out


def _self_test(w: np.ndarray, scorer: _Scorer, box: float, chunk: int) -> np.ndarray:
    """Margin of each word for ``h = w_v − mean(W)`` in the box (−inf where it does not win)."""
    n = w.shape[0]
    centre = w.mean(axis=0)
    margins = np.full(n, -np.inf)
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        logits = scorer.logits(_to_box(w[rows] - centre, box))
        own = logits[np.arange(rows.size), rows].astype(np.float64)
        logits[np.arange(rows.size), rows] = -np.inf
        margins[rows] = own - logits.max(axis=1)
    return margins


def _direction_test(scorer: _Scorer, dim: int, box: float, n_random: int, seed: int, chunk: int) -> dict[int, float]:
    """Winners (with their margins) of random directions and of the ±coordinate axes."""
    rng = np.random.default_rng(seed)
    axes = np.concatenate([np.eye(dim), -np.eye(dim)]) * box
    directions = np.concatenate([axes, _to_box(rng.standard_normal((n_random, dim)), box)])
    winners: dict[int, float] = {}
    if scorer.w32.shape[0] < 2:
        return winners
    for start in range(0, directions.shape[0], chunk):
        logits = scorer.logits(directions[start : start + chunk])
        top2 = np.argpartition(-logits, 1, axis=1)[:, :2]
        first = np.take_along_axis(logits, top2, axis=1).astype(np.float64)
        order = np.argsort(-first, axis=1)
        best = np.take_along_axis(top2, order[:, :1], axis=1)[:, 0]
        margin = np.abs(first[:, 0] - first[:, 1])
        for v, m in zip(best.tolist(), margin.tolist(), strict=True):
            winners[v] = max(m, winners.get(v, -math.inf))
    return winners


def _full_margin(w: np.ndarray, b: np.ndarray, v: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact (float64) margin of words ``v`` at hidden states ``h`` [n, D], and the strongest competitor."""
    logits = h @ w.T + b
    own = logits[np.arange(v.size), v].copy()
    logits[np.arange(v.size), v] = -np.inf
    rival = logits.argmax(axis=1)
    return own - logits[np.arange(v.size), rival], rival


def _greedy(
    w: np.ndarray, b: np.ndarray, words: np.ndarray, box: float, tol: float, steps: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """Subgradient ascent on each word's margin.

    Returns the best margins, the hidden states reaching them, success flags, and
    per word the rivals met on the way: the constraints that bind, which seed the LP.
    """
    h = _to_box(w[words], box)
    best_margin = np.full(words.size, -np.inf)
    best_h = h.copy()
    rivals = []
    for step in range(steps + 1):
        margin, rival = _full_margin(w, b, words, h)
        rivals.append(rival)
        better = margin > best_margin
        best_margin[better], best_h[better] = margin[better], h[better]
        if step == steps or (best_margin > tol).all():
            break
        direction = _to_box(w[words] - w[rival], box)
        h = np.clip(h + direction / math.sqrt(step + 1.0), -box, box)
    met = np.stack(rivals, axis=1)
    return best_margin, best_h, best_margin > tol, [np.unique(row) for row in met]


def lp_margin(
    w: np.ndarray,
    b: np.ndarray,
    v: int,
    h0: np.ndarray,
    *,
    box: float,
    tolerance: float,
    n_constraints: int = 64,
    max_rounds: int = 100,
    seed_constraints: np.ndarray | None = None,
) -> tuple[bool | None, float, int]:
    """Decide word ``v`` exactly: max t s.t. (w_u − w_v)·h + t ≤ b_v − b_u ∀u≠v, −box ≤ h ≤ box, t ≤ 1.

    Constraint generation, starting from the ``max(n_constraints, D + 1)`` strongest
    competitors at ``h0`` plus ``seed_constraints``, adding as many violated ones per
    round. Returns (argmaxable, margin, LP solves); argmaxable is None when
    ``max_rounds`` rounds did not settle it.
    """
    n, dim = w.shape
    if n == 1:
        return True, 1.0, 0
    # a word inside the hull is pinned (t ≤ 0) only by ≥ D + 1 competitors around it
    n_constraints = max(n_constraints, dim + 1)
    logits = w @ h0 + b
    logits[v] = -np.inf
    active = np.argsort(-logits)[: min(n_constraints, n - 1)]
    if seed_constraints is not None:
        active = np.union1d(active, seed_constraints[seed_constraints != v])
    cost = np.zeros(dim + 1)
    cost[-1] = -1.0
    bounds = [(-box, box)] * dim + [(None, 1.0)]
    for solves in range(1, max_rounds + 1):
        a_ub = np.hstack([w[active] - w[v], np.ones((active.size, 1))])
        res = linprog(cost, A_ub=a_ub, b_ub=b[v] - b[active], bounds=bounds, method="highs")
        if res.status != 0:
            raise RuntimeError(f"LP for word {v} failed: {res.message}")
        h, t = res.x[:-1], float(res.x[-1])
        if t <= tolerance:
            return False, t, solves
        margins = (w[v] - w) @ h + (b[v] - b)
        margins[v] = np.inf
        worst = float(margins.min())
        if worst > tolerance:
            return True, worst, solves
        violated = np.flatnonzero(margins < t - 1e-12)
        violated = violated[np.argsort(margins[violated])][:n_constraints]
        active = np.union1d(active, violated)
    return None, math.nan, max_rounds


def argmaxable_words(
    w: np.ndarray,
    b: np.ndarray | None = None,
    *,
    box: float = 1.0,
    tolerance: float = 1e-6,
    n_random: int = 1024,
    greedy_steps: int = 50,
    lp_constraints: int = 64,
    max_rounds: int = 100,
    chunk: int = 1024,
    seed: int = 0,
) -> ArgmaxReport:
    """Which rows of ``w`` (V×D, bias ``b``) can be the argmax of ``w·h + b`` for some ``h`` in the box."""
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"output embeddings must be a non-empty V×D matrix, got {w.shape}")
    n, dim = w.shape
    b = np.zeros(n) if b is None else np.asarray(b, dtype=np.float64)
    if b.shape != (n,):
        raise ValueError(f"bias {b.shape} must be [V] = [{n}]")
    if not (np.isfinite(w).all() and np.isfinite(b).all()):
        raise ValueError("output embeddings or bias contain NaN or inf")
    if not (box > 0 and tolerance >= 0):
        raise ValueError(f"box must be > 0 and tolerance >= 0, got {box}, {tolerance}")
    report = ArgmaxReport(
        np.zeros(n, bool), np.full(n, STAGES.index("undecided"), np.int8), np.full(n, np.nan), box, tolerance
    )
    seconds = report.seconds
    scorer = _Scorer(w, b, box)
    threshold = tolerance + scorer.error

    def decide(words: np.ndarray, margins: np.ndarray, stage: str, ok: np.ndarray) -> None:
        report.argmaxable[words[ok]] = True
        report.stage[words[ok]] = STAGES.index(stage)
        report.margin[words[ok]] = margins[ok]

    tic = time.perf_counter()
    margins = _self_test(w, scorer, box, chunk) if n > 1 else np.full(n, np.inf)
    decide(np.arange(n), margins, "self", margins > threshold)
    seconds["self"] = time.perf_counter() - tic

    tic = time.perf_counter()
    winners = _direction_test(scorer, dim, box, n_random, seed, chunk)
    found = np.array([v for v, m in winners.items() if m > threshold and not report.argmaxable[v]], dtype=np.int64)
    decide(found, np.array([winners[v] for v in found.tolist()]), "random", np.ones(found.size, bool))
    seconds["random"] = time.perf_counter() - tic

    tic = time.perf_counter()
    todo = np.flatnonzero(~report.argmaxable)
    starts = np.zeros((todo.size, dim))
    met: list[np.ndarray] = []
    for lo in range(0, todo.size, max(1, chunk // 4)):
        part = todo[lo : lo + max(1, chunk // 4)]
        margin, h, ok, rivals = _greedy(w, b, part, box, tolerance, greedy_steps)
        decide(part, margin, "greedy", ok)
        starts[lo : lo + part.size] = h
        met.extend(rivals)
    seconds["greedy"] = time.perf_counter() - tic

    tic = time.perf_counter()
    for i, v in enumerate(todo.tolist()):
        if report.argmaxable[v]:
            continue
        verdict, margin, solves = lp_margin(
            w,
            b,
            v,
            starts[i],
            box=box,
            tolerance=tolerance,
            n_constraints=lp_constraints,
            max_rounds=max_rounds,
            seed_constraints=met[i],
        )
        report.lp_solves += solves
        report.margin[v] = margin
        if verdict is not None:
            report.argmaxable[v] = verdict
            report.stage[v] = STAGES.index("lp")
    seconds["lp"] = time.perf_counter() - tic
    return report


def load_output_embedding(
    weights: str | Path, bias: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """The softmax matrix W (V×D) and bias of a fairseq checkpoint or a .npy file, and where it came from.

    From a checkpoint: ``decoder.output_projection.weight`` (``decoder.embed_out`` in
    old checkpoints; the input embedding when the model shares it), plus
    ``decoder.output_projection.bias`` if present. Checkpoints are unpickled like
    fairseq does: load only checkpoints you trust.
    """
    path = Path(weights)
    if not path.is_file():
        raise KnnlmError(f"--weights {path} does not exist; pass a fairseq checkpoint or a V×D .npy matrix")
    if path.suffix == ".npy":
        w = _load_npy(path, 2, "--weights")
        source = str(path)
        b = None
    else:
        w, b, source = _from_checkpoint(path)
    if bias is not None:
        if b is not None:
            raise KnnlmError(f"{path} already holds a bias ({source}); drop --bias")
        b = _load_npy(Path(bias), 1, "--bias")
        if b.shape[0] != w.shape[0]:
            raise KnnlmError(f"--bias {bias} has {b.shape[0]} entries for the {w.shape[0]} rows of {path}")
    return w, b, source


def _load_npy(path: Path, ndim: int, option: str) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise KnnlmError(f"{option} {path} is not a readable .npy file ({err})") from err
    if arr.ndim != ndim or arr.dtype.kind != "f":
        raise KnnlmError(f"{option} {path} must be a {ndim}-d float array, got {arr.dtype} {arr.shape}")
    return arr


def _cfg_value(cfg: Any, key: str) -> Any:
    model = cfg.get("model") if isinstance(cfg, dict) else getattr(cfg, "model", None)
    if model is None:
        return None
    return model.get(key) if isinstance(model, dict) else getattr(model, key, None)


def _from_checkpoint(path: Path) -> tuple[np.ndarray, np.ndarray | None, str]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        raise KnnlmError(f"--weights {path} is not a readable torch checkpoint ({err})") from err
    model = state.get("model") if isinstance(state, dict) else None
    if not isinstance(model, dict):
        raise KnnlmError(f"{path} has no 'model' state dict; pass a fairseq checkpoint or a .npy matrix")
    if any(k.startswith("decoder.adaptive_softmax.") for k in model):
        raise KnnlmError(
            f"{path} has an adaptive softmax (decoder.adaptive_softmax.*): its words are scored by a head and "
            f"tail clusters with their own projections, not one V×D matrix, so the argmaxable test (a plain "
            f"softmax head) does not apply. Use a model with a plain softmax, or pass a matrix as .npy"
        )
    cfg = state.get("cfg") or {"model": state.get("args")}
    shared = bool(_cfg_value(cfg, "share_decoder_input_output_embed"))
    for key in ("decoder.output_projection.weight", "decoder.embed_out"):
        if key in model:
            name = key
            break
    else:
        if not (shared and "decoder.embed_tokens.weight" in model):
            keys = ", ".join(k for k in model if k.startswith("decoder.") and "layers." not in k)
            raise KnnlmError(
                f"{path} has no output projection (decoder.output_projection.weight); decoder keys: {keys}"
            )
        name = "decoder.embed_tokens.weight"
    w = model[name].float().numpy()
    bias_key = "decoder.output_projection.bias"
    b = model[bias_key].float().numpy() if bias_key in model else None
    where = os.path.relpath(path) if os.path.isabs(path) else path  # committed with the results
    return w, b, f"{where}:{name}" + (f"+{bias_key}" if b is not None else "")


def plot_stolen(w: np.ndarray, report: ArgmaxReport, vocab: Vocabulary | None, path: Path) -> Path:
    """Norm of each output embedding against its frequency rank (or id), un-argmaxable words highlighted."""
    norms = np.linalg.norm(w, axis=1)
    ids = np.arange(w.shape[0])
    with paper_style():
        fig, (ax,) = new_figure(1)
        ok = report.argmaxable
        ax.scatter(ids[ok] + 1, norms[ok], s=2, color="0.6", linewidths=0, label=f"argmaxable ({ok.sum()})")
        ax.scatter(
            ids[~ok] + 1,
            norms[~ok],
            s=12,
            marker="x",
            color=PAIR_COLOURS[1],
            linewidths=0.8,
            label=f"not argmaxable ({(~ok).sum()})",
        )
        ax.set_xscale("log")
        ax.set_xlabel("word id + 1 (frequency rank)" if vocab is not None else "row of W + 1")
        ax.set_ylabel("‖w_v‖ (output embedding norm)")
        ax.set_title(f"{report.n_lp} of {w.shape[0]} words needed the LP")
        ax.legend(frameon=False)
        return save_figure(fig, path)


def run(cfg: StolenConfig) -> list[Path]:
    """Test every word of the softmax; write CSV (per word), PNG and JSON under ``cfg.out``."""
    if not (cfg.box > 0 and cfg.tolerance >= 0 and cfg.n_random >= 0 and cfg.greedy_steps >= 0):
        raise KnnlmError("--box must be > 0 and --tolerance, --n-random, --greedy-steps >= 0")
    if cfg.chunk < 1 or cfg.lp_constraints < 1 or cfg.max_rounds < 1:
        raise KnnlmError("--chunk, --lp-constraints and --max-rounds must be at least 1")
    w, b, source = load_output_embedding(cfg.weights, cfg.bias)
    vocab = (
        read_dictionary(resolve_dictionary(cfg.dictionary, cfg.data_bin)) if (cfg.dictionary or cfg.data_bin) else None
    )
    if vocab is not None and len(vocab) != w.shape[0]:
        raise KnnlmError(f"{source} has {w.shape[0]} rows but {vocab.path} has {len(vocab)} symbols; wrong --dict")
    tic = time.perf_counter()
    report = argmaxable_words(
        w,
        b,
        box=cfg.box,
        tolerance=cfg.tolerance,
        n_random=cfg.n_random,
        greedy_steps=cfg.greedy_steps,
        lp_constraints=cfg.lp_constraints,
        max_rounds=cfg.max_rounds,
        chunk=cfg.chunk,
        seed=cfg.seed,
    )
    total = time.perf_counter() - tic
    names = list(vocab.symbols) if vocab is not None else [str(i) for i in range(w.shape[0])]
    out = Path(cfg.out)
    rows = [
        [i, names[i], bool(report.argmaxable[i]), STAGES[report.stage[i]], report.margin[i]] for i in range(w.shape[0])
    ]
    files = [
        write_csv(out / f"{NAME}.csv", ["id", "word", "argmaxable", "decided_by", "margin"], rows),
        plot_stolen(w, report, vocab, out / f"{NAME}.png"),
    ]
    not_argmaxable = np.flatnonzero(~report.argmaxable & (report.stage != STAGES.index("undecided")))
    undecided = np.flatnonzero(report.stage == STAGES.index("undecided"))
    summary = {
        "analysis": NAME,
        "weights": source,
        "shape": list(w.shape),
        "bias": b is not None,
        "settings": {
            k: getattr(cfg, k)
            for k in ("box", "tolerance", "n_random", "greedy_steps", "lp_constraints", "max_rounds", "chunk", "seed")
        },
        "n_words": int(w.shape[0]),
        "n_argmaxable": int(report.argmaxable.sum()),
        "n_not_argmaxable": int(not_argmaxable.size),
        "n_undecided": int(undecided.size),
        "not_argmaxable": [names[i] for i in not_argmaxable.tolist()],
        "not_argmaxable_ids": not_argmaxable,
        "undecided": [names[i] for i in undecided.tolist()],
        "decided_by": report.counts(),
        "n_needed_lp": report.n_lp,
        "lp_solves": report.lp_solves,
        "seconds": {**report.seconds, "total": total},
    }
    files.append(write_json(out / f"{NAME}.json", summary))
    logger.info(
        "stolen probabilities: %d of %d words not argmaxable, %d needed the LP (%.1f s); %s",
        not_argmaxable.size,
        w.shape[0],
        report.n_lp,
        total,
        ", ".join(str(f) for f in files),
    )
    return files
