"""kNN-LM generation with Hugging Face models: a logits processor that applies Eq. 5 at each step.

::

    retriever = Retriever.open("datastores/gpt2/att", index="indexes/gpt2.att.l2.faiss")
    with KnnLogitsProcessor(model, retriever, k=1024, lmbda=0.25) as knn:
        out = model.generate(input_ids, attention_mask=mask, logits_processor=[knn], max_new_tokens=20)

At every step ``generate`` runs one forward of the model on the current rows (batch × beams:
beam search reorders the KV cache before that forward, not after), then calls the processors on
that forward's logits. The ``att``/``ffn`` key of the forward is read by the hooks of
:class:`knnlm.models.hf.HFKeyCapture`; its last position is the query of each row — with the KV
cache the forward sees only the new token, without it the whole sequence, and with left padding
the last position is always a real token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from knnlm.datastore.retriever import Retriever
from knnlm.errors import KnnlmError
from knnlm.models.capture import KEY_TYPES
from knnlm.models.hf import HFKeyCapture, import_transformers
from knnlm.scoring_torch import interpolate, knn_log_distribution

LogitsProcessor = import_transformers().LogitsProcessor


class KnnLogitsProcessor(LogitsProcessor):
    """Returns ``log((1 − λ)·p_LM + λ·p_kNN)`` over the model's whole output vocabulary.

    ``p_LM`` is the softmax of the scores the processor receives (the model's logits, or the
    log-probabilities beam search passes; processors listed before this one act on ``p_LM``),
    computed in float64; ``p_kNN`` is ``M · softmax(mask-to-k(scores) / τ)`` of the ``k``
    neighbours of the step's query. Tokens that an earlier processor set to −inf stay −inf.
    Sampling warpers (``temperature``, ``top_k``, ``top_p``) run after it, on the mixture.

    The hooks stay on ``model`` until :meth:`remove` (or the end of a ``with`` block).
    """

    def __init__(
        self,
        model: nn.Module,
        retriever: Retriever,
        *,
        k: int = 1024,
        lmbda: float = 0.25,
        temperature: float = 1.0,
        key_type: str | None = None,
    ) -> None:
        key_type = key_type or retriever.store.key_type
        if key_type not in KEY_TYPES:
            raise KnnlmError(f"key_type must be one of {', '.join(KEY_TYPES)}; got {key_type!r}")
        if not 0.0 <= lmbda <= 1.0:
            raise KnnlmError(f"lmbda (λ) must be in [0, 1]; got {lmbda}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise KnnlmError(f"temperature (τ) must be positive and finite; got {temperature}")
        if k < 1:
            raise KnnlmError(f"k must be at least 1; got {k}")
        hidden = getattr(model.config, "hidden_size", None)
        retriever.store.check_compatible(key_type=key_type, key_dim=None if hidden is None else int(hidden))
        self.retriever = retriever
        self.k = min(int(k), retriever.num_keys)
        self.lmbda = float(lmbda)
        self.temperature = float(temperature)
        self.key_type = key_type
        self.capture = HFKeyCapture(model)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        try:
            keys = self.capture.pop(self.key_type)
        except RuntimeError:
            raise KnnlmError(
                "KnnLogitsProcessor found no captured key: pass it to generate() of the model it was built on "
                "(its hooks are on that model), and do not remove() it before"
            ) from None
        finally:
            self.capture.clear()
        if keys.shape[0] != scores.shape[0]:
            raise KnnlmError(
                f"the step's forward had {keys.shape[0]} rows but the scores have {scores.shape[0]}: the "
                "processor needs the forward of the same rows just before it (assisted decoding and "
                "batched-beam variants that score other rows are not supported)"
            )
        return self.mix(scores, keys[:, -1])

    @torch.no_grad()
    def mix(self, scores: Tensor, queries: Tensor) -> Tensor:
        """Eq. 5 for ``scores`` [N, V] (logits or log-probs) and the ``queries`` [N, D] of the same rows."""
        vocab = scores.shape[-1]
        lm = torch.log_softmax(scores.double(), dim=-1)
        knn_scores, ids = self.retriever.search(queries.detach().float().cpu().numpy(), self.k)
        vals = self.retriever.values_of(ids)
        if vals.size and int(vals.max()) >= vocab:
            raise KnnlmError(
                f"the datastore holds token id {int(vals.max())} but the model scores {vocab} tokens: it was "
                "built with another tokenizer or model; build it from this model"
            )
        knn = knn_log_distribution(
            torch.from_numpy(knn_scores).to(scores.device),
            torch.from_numpy(vals).to(scores.device),
            vocab,
            self.k,
            self.temperature,
        )
        mixed = interpolate(lm, knn, self.lmbda)
        mixed = mixed.masked_fill(torch.isneginf(scores), -math.inf)
        return mixed.to(scores.dtype)

    def remove(self) -> None:
        """Take the hooks off the model."""
        self.capture.remove()

    def __enter__(self) -> KnnLogitsProcessor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
