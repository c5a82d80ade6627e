"""The base LM as the datastore build and the eval dump see it: a fairseq checkpoint or a HF causal LM.

There is one data path. Both passes cut a split's token stream with
:class:`~knnlm.models.windows.ContextPlan`, assemble windows with
:func:`~knnlm.models.windows.batch_inputs`, and only then ask a
:class:`BaseLM` for what depends on the model: the ``att``/``ffn`` keys (through
hooks) and the log-probabilities of the targets. The two implementations are
:class:`knnlm.models.fairseq_lm.FairseqLM` (``--checkpoint``) and
:class:`knnlm.models.hf.HFCausalLM` (``--hf-model``, needs ``pip install -e .[hf]``);
:func:`knnlm.models.factory.open_base_lm` opens the one a command line names.
This module is the interface only: it imports neither implementation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from knnlm.models.windows import TokenStream


@dataclass
class SplitTokens:
    """A split as model token ids, with what a token is.

    ``word_ids[i]`` is the dataset word that token ``i`` belongs to (sub-word pieces
    merged back); ``None`` where tokens are the dataset's words already.
    ``units`` is recorded in every artifact's metadata.
    """

    stream: TokenStream
    data_sha256: str
    word_ids: np.ndarray | None = None
    units: dict[str, Any] = field(default_factory=dict)


class Capture(Protocol):
    """What a key capture offers: the keys of the last forward, batch-first ``B x T x C``."""

    def pop(self, key_type: str) -> Tensor: ...

    def clear(self) -> None: ...

    def remove(self) -> None: ...


class BaseLM(Protocol):
    """The model-dependent half of the datastore build and the eval dump."""

    pad: int  # any id that fills windows shorter than the batch's widest (right padding; causal models)
    vocab_size: int  # rows of the output layer: every target id is below it
    default_tokens_per_sample: int
    max_positions: int | None

    def describe(self) -> str:
        """The model for messages (a path or a hub name)."""

    def source(self) -> dict[str, Any]:
        """Fingerprints for meta.json: ``checkpoint_sha256``, ``dictionary_sha256``, ``dictionary_size``,
        ``base_model`` (what loaded the model, to refuse artifacts of another one)."""

    def paths(self) -> dict[str, str]:
        """Where the model came from (recorded, not part of any id)."""

    def key_dim(self, key_type: str) -> int: ...

    def load_split(self, data: str | os.PathLike, split: str, words: bool = False) -> SplitTokens:
        """The split as this model's tokens; ``words``: also map tokens to the dataset's words."""

    def prepare(self, device: torch.device, fp16: bool) -> None:
        """Eval mode, on ``device``, in half precision if asked."""

    def capture(self) -> Capture:
        """Hooks recording ``att`` and ``ffn``; ``remove()`` it when done."""

    def features(self, tokens: Tensor) -> None:
        """Forward ``tokens`` [B, T] far enough to fill the capture (the output layer may be skipped)."""

    def target_logprobs(self, tokens: Tensor, rows: Tensor, cols: Tensor, targets: Tensor) -> Tensor:
        """Full forward; fp32 natural-log probability of ``targets[i]`` at ``tokens[rows[i], cols[i]]``."""
