"""``--criterion activation_l2``: cross-entropy plus an L2 penalty on the kNN key (Ton et al. 2022, Eq. 2).

Objective of one batch, as returned to fairseq's trainer::

    loss = Σ_j CE_j + ω · Σ_j ||r_j||²

where ``j`` runs over every non-pad target position of the batch, ``CE_j`` is the
negative log-likelihood of target ``j`` (nats, computed in fp32) and ``r_j`` the kNN
key representation (``--knn-key att|ffn``, see :mod:`knnlm.models.capture`) of the
context predicting it, cast to fp32. Both sums are over tokens, exactly like
fairseq's ``cross_entropy`` and ``adaptive_loss``, and the trainer divides the
gradient by the same ``sample_size`` (the number of non-pad target tokens, or of
sentences with ``--sentence-avg``). With token averaging the optimized objective
is therefore ``mean_j CE_j + ω · mean_j ||r_j||²``: ω means the same thing at every
batch size, ``--update-freq`` and number of GPUs.

Logged metrics: ``loss``/``nll_loss``/``ppl`` are the pure cross-entropy (base 2,
as fairseq logs them), so perplexities stay comparable with plain training and
``--best-checkpoint-metric loss`` selects on validation CE. ``penalty`` is
``ω · Σ_j ||r_j||² / sample_size`` (nats, the amount added to the per-token
objective) and ``key_sq_norm`` is ``mean_j ||r_j||²`` (unweighted).

One criterion serves plain and adaptive softmax: with an adaptive softmax the CE
goes through ``model.decoder.adaptive_softmax`` like ``adaptive_loss`` (which
refuses PyTorch DDP even on one process); here only data-parallel training with
``--ddp-backend c10d|pytorch_ddp`` is refused, where DDP would meet the unused tail
clusters. Models of the ``knnlm_transformer_lm`` family hand the key over in
``extra``; for any other fairseq transformer LM (stock ``transformer_lm``) the
criterion attaches a :class:`~knnlm.models.capture.KeyCapture` to its decoder.
"""

# no `from __future__ import annotations`: fairseq reads dataclass field types at runtime

import math
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.dataclass.constants import DDP_BACKEND_CHOICES
from fairseq.logging import metrics
from omegaconf import II
from torch import Tensor, nn

from knnlm.criterions.logged_loss import log_loss_bits
from knnlm.errors import KnnlmError
from knnlm.models.capture import KEY_TYPES, KeyCapture

KNN_KEY_CHOICES = ChoiceEnum(list(KEY_TYPES))


@dataclass
class ActivationL2Config(FairseqDataclass):
    activation_weight: float = field(
        default=1.0,
        metadata={
            "help": "ω: weight of the regularizer, per target token (Eq. 2: ω·||r||²; the paper's "
            "best value is 1; 0 gives plain cross-entropy)"
        },
    )
    knn_key: KNN_KEY_CHOICES = field(
        default="att",
        metadata={
            "help": "representation that is regularized, i.e. the one later used as kNN key: "
            "att = input of the last layer's FFN, ffn = final hidden state"
        },
    )
    sentence_avg: bool = II("optimization.sentence_avg")
    ddp_backend: DDP_BACKEND_CHOICES = II("distributed_training.ddp_backend")
    distributed_world_size: int = II("distributed_training.distributed_world_size")


def at_least_fp32(tensor: Tensor) -> Tensor:
    """``tensor`` in fp32 if it is in a 16-bit float type, else unchanged (fp64 tests stay fp64)."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def token_nll(model: nn.Module, net_output: tuple, target: Tensor, padding_idx: int) -> Tensor:
    """Negative log-likelihood (nats, fp32) of every target position, flat ``(B*T,)``, 0 at padding.

    At least fp32 whatever the model's dtype (``get_normalized_probs`` casts to fp32), so
    that ``--fp16`` training does not sum CE in half precision.
    """
    flat_target = target.reshape(-1)
    adaptive = getattr(model.decoder, "adaptive_softmax", None)
    if adaptive is None:
        lprobs = model.get_normalized_probs(net_output, log_probs=True)
        lprobs = at_least_fp32(lprobs.reshape(-1, lprobs.size(-1)))
        return F.nll_loss(lprobs, flat_target, ignore_index=padding_idx, reduction="none")
    # adaptive softmax: the head scores every position (tail words by their cluster id);
    # each tail cluster scores only the positions whose target falls in it.
    logits, targets = adaptive(net_output[0], flat_target)
    _, rows = adaptive.adapt_target(flat_target)
    nll = F.cross_entropy(at_least_fp32(logits[0]), targets[0], ignore_index=padding_idx, reduction="none")
    for tail_logits, tail_target, tail_rows in zip(logits[1:], targets[1:], rows, strict=True):
        if tail_target is not None:
            tail_nll = F.cross_entropy(at_least_fp32(tail_logits), tail_target, reduction="none")
            nll = nll.index_add(0, tail_rows, tail_nll)
    return nll


@register_criterion("activation_l2", dataclass=ActivationL2Config)
class ActivationL2Criterion(FairseqCriterion):
    """Cross-entropy + ω·||r||² on the kNN key of every target token (Eq. 2).

    Subclasses change the per-token regularizer through :meth:`key_penalty` and may
    act on the batch after the loss through :meth:`after_loss`.
    """

    def __init__(
        self,
        task,
        activation_weight: float = 1.0,
        knn_key: str = "att",
        sentence_avg: bool = False,
        ddp_backend: str = "legacy_ddp",
        distributed_world_size: int = 1,
    ) -> None:
        super().__init__(task)
        knn_key = str(knn_key)
        if knn_key not in KEY_TYPES:
            raise KnnlmError(f"--knn-key {knn_key!r} is not one of {', '.join(KEY_TYPES)}")
        if not math.isfinite(activation_weight) or activation_weight < 0:
            raise KnnlmError(f"--activation-weight must be a finite number >= 0, got {activation_weight}")
        self.activation_weight = float(activation_weight)
        self.knn_key = knn_key
        self.sentence_avg = sentence_avg
        self.ddp_backend = str(ddp_backend)
        self.distributed_world_size = int(distributed_world_size)
        # decoder -> KeyCapture, for models that do not return their keys in `extra`
        self._captures: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # -- keys -------------------------------------------------------------------------

    def _capture_for(self, model: nn.Module) -> Optional[KeyCapture]:
        """The hook capture of ``model``'s decoder, or None when the model returns keys itself."""
        if getattr(model, "key_capture", None) is not None:
            return None
        decoder = model.decoder
        capture = self._captures.get(decoder)
        if capture is None:
            capture = KeyCapture(decoder)
            self._captures[decoder] = capture
        capture.clear()
        return capture

    def _take_keys(self, net_output: tuple, capture: Optional[KeyCapture]) -> Tensor:
        """The ``B x T x D`` key of the forward that produced ``net_output`` (graph kept)."""
        if capture is None:
            extra = net_output[1]
            if not isinstance(extra, dict) or self.knn_key not in extra:
                raise KnnlmError(
                    f"{type(self).__name__}: the model has a key_capture but its forward put "
                    f"no {self.knn_key!r} key in its extra output; use a knnlm_transformer_lm* arch or a "
                    f"fairseq transformer_lm"
                )
            return extra[self.knn_key]
        keys = capture.pop(self.knn_key)
        capture.clear()  # drop the other key type: it would keep its graph alive
        return keys

    # -- hooks for subclasses -------------------------------------------------------------

    def key_penalty(self, keys: Tensor, words: Tensor) -> tuple[Tensor, dict]:
        """Per-token regularizer before ω (``||r_j||²``) and extra summable log entries.

        ``keys``: ``N x D`` keys (fp32 or wider) of the non-pad targets ``words`` (``N``).
        """
        return keys.pow(2).sum(-1), {}

    def after_loss(self, model: nn.Module, sample: dict, mask: Tensor, words: Tensor) -> None:
        """Called once the loss of a batch is computed; nothing to do for Eq. 2."""

    # -- fairseq interface ----------------------------------------------------------------

    def _check_softmax(self, model: nn.Module) -> None:
        adaptive = getattr(model.decoder, "adaptive_softmax", None) is not None
        if adaptive and self.distributed_world_size > 1 and self.ddp_backend in {"c10d", "pytorch_ddp"}:
            raise KnnlmError(
                f"{self.__class__.__name__} with an adaptive softmax cannot run under PyTorch "
                f"DistributedDataParallel (--ddp-backend {self.ddp_backend}): its tail clusters "
                f"get no gradient on most batches. Use --ddp-backend legacy_ddp."
            )

    def forward(self, model: nn.Module, sample: dict, reduce: bool = True):
        """Loss, sample size and logging outputs of one batch (see the module docstring)."""
        self._check_softmax(model)
        capture = self._capture_for(model)
        net_output = model(**sample["net_input"])
        keys = self._take_keys(net_output, capture)
        target = model.get_targets(sample, net_output)
        mask = target.ne(self.padding_idx)
        nll = token_nll(model, net_output, target, self.padding_idx)
        words = target[mask]
        r = at_least_fp32(keys[mask])
        penalty, extra_logs = self.key_penalty(r, words)
        if reduce:
            ce = nll.sum()
            penalty_sum = penalty.sum()
            loss = ce + self.activation_weight * penalty_sum
        else:
            per_position = penalty.new_zeros(nll.shape).index_put((mask.reshape(-1),), penalty)
            loss = nll + self.activation_weight * per_position
            ce, penalty_sum = nll.sum(), penalty.sum()
        self.after_loss(model, sample, mask, words)

        ntokens = words.numel()
        sample_size = target.size(0) if self.sentence_avg else ntokens
        logging_output = {
            "loss": ce.data,
            "nll_loss": ce.data,
            "penalty": self.activation_weight * penalty_sum.data,
            "key_sq_norm": r.detach().pow(2).sum(),
            "ntokens": ntokens,
            "nsentences": target.size(0),
            "sample_size": sample_size,
            **{k: v.detach() if torch.is_tensor(v) else v for k, v in extra_logs.items()},
        }
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        """CE as fairseq logs it (``loss``, ``nll_loss``, ``ppl``), then the regularizer."""

        def total(key: str) -> float:
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        loss_sum, ntokens, sample_size = total("loss"), total("ntokens"), total("sample_size")
        if sample_size == 0:
            return
        log_loss_bits("loss", loss_sum, sample_size)
        if sample_size != ntokens:
            log_loss_bits("nll_loss", loss_sum, ntokens)
            metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
        else:
            metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["loss"].avg))
        metrics.log_scalar("penalty", total("penalty") / sample_size, sample_size, round=4)
        metrics.log_scalar("key_sq_norm", total("key_sq_norm") / ntokens, ntokens, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
