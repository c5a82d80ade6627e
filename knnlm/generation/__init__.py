"""kNN-LM decoding: Eq. 5 at every step of generation.

Two front ends share the search (:class:`knnlm.datastore.retriever.Retriever`) and the
math (:mod:`knnlm.scoring_torch`):

- :mod:`knnlm.generation.hf`: :class:`KnnLogitsProcessor`, a ``transformers`` logits
  processor for ``model.generate`` (greedy, sampling, beam search);
- :mod:`knnlm.generation.fairseq_lm`: ``knnlm generate`` on a fairseq checkpoint, through
  fairseq's ``SequenceGenerator``.

``KnnLogitsProcessor`` is imported lazily, so that the fairseq path never needs transformers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KnnLogitsProcessor"]


def __getattr__(name: str) -> Any:
    if name == "KnnLogitsProcessor":
        from knnlm.generation.hf import KnnLogitsProcessor

        return KnnLogitsProcessor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
