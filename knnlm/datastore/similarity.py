"""The one score convention of the project: a *score* is a similarity, higher is better.

* ``ip``: score = q·k (inner product).
* ``l2``: score = −‖q − k‖² (negative *squared* Euclidean distance).

FAISS L2 indexes return squared distances (lower is better); they are turned
into scores at the boundary by :func:`faiss_distances_to_scores`, and nothing
past that boundary ever sees a distance. Missing neighbours (id −1, e.g. an IVF
probe that found fewer than k candidates) get score −inf.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from knnlm.errors import KnnlmError

Similarity = Literal["ip", "l2"]
SIMILARITIES: tuple[Similarity, ...] = ("ip", "l2")


def check_similarity(similarity: str) -> Similarity:
    """Validate a similarity name (a user option) and return it typed."""
    if similarity not in SIMILARITIES:
        raise KnnlmError(f"unknown similarity {similarity!r}; choose one of {', '.join(SIMILARITIES)}")
    return similarity  # type: ignore[return-value]


def faiss_distances_to_scores(distances: np.ndarray, ids: np.ndarray, similarity: Similarity) -> np.ndarray:
    """Convert FAISS search output to scores: IP as is, L2 squared distance negated; −inf where id is −1."""
    scores = np.asarray(distances, dtype=np.float32)
    scores = scores.copy() if similarity == "ip" else -scores
    scores[ids < 0] = -np.inf
    return scores
