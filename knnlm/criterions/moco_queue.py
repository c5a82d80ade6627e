"""``--criterion moco_queue``: pull each key towards recent keys of the same next word (Ton et al. 2022, Eq. 1).

Objective of one batch, as returned to fairseq's trainer::

    loss = Σ_j CE_j + ω · Σ_j Σ_{i filled} ||sg(Q_i^{w_j}) − r_j||²

with the notation and the token-sum scaling of :mod:`knnlm.criterions.activation_l2`
(the trainer divides by the number of target tokens, so the optimized objective is
``mean_j CE_j + ω · mean_j Σ_i ||q_i − r_j||²``). ``Q^w`` is a FIFO queue of the last
``L`` (``--queue-size``) keys of contexts followed by ``w``, produced without
gradient by a momentum encoder: a copy of the model, updated as
``θ_k ← m·θ_k + (1 − m)·θ_q`` (``--moco-momentum m``), run without dropout. Slots not
yet filled do not count, so the regularizer starts at zero and grows as the queues
fill. With every queue full of zeros it is ``L·||r_j||²``, i.e. activation_l2 with
weight ``L·ω`` (the paper's simplification).

Order of events in a training forward: (1) momentum update if an optimizer step
changed the weights since the last one (below); (2) online forward, CE and regularizer against the queues as they
are; (3) momentum-encoder forward on the same batch, whose keys are appended to
the queues of the batch's target words in batch order. Validation forwards
neither update nor append.

When the momentum update happens. fairseq 0.12 never tells a criterion about
optimizer steps: the trainer calls ``task.train_step`` once per micro-batch, which
calls ``model.set_num_updates(n)`` before the forward (the same ``n`` for every
micro-batch of a step, and again after a step skipped for fp16 overflow), and a
listener would miss the announcement of the very step at which the criterion
first sees the model. The criterion therefore watches the model itself: at every
training forward it computes a fingerprint of the online parameters (fp64
``Σθ`` and ``||θ||`` of every parameter tensor, one read of the weights) and applies
one momentum update when it differs from the fingerprint at the previous update.
That is exactly once after every optimizer step that changed the weights, using
the weights it produced, whatever ``--update-freq``; a step skipped for fp16
overflow, or one with learning rate 0, changes nothing and updates nothing.

Checkpoints. fairseq's trainer saves ``criterion.state_dict()`` under
``"criterion"`` and restores it with ``criterion.load_state_dict`` -- but only for a
criterion that has parameters at that moment, and a resume restores it before the
first forward, when the momentum encoder (a copy of a model this criterion has
not seen yet) cannot exist. The criterion thus owns one empty frozen parameter,
``state_anchor``, so both calls happen; a restored state (momentum encoder, queues
and the fingerprint of the last update) is kept aside and loaded when they are
built at the first forward. The fingerprint comparison then makes the update the
interrupted run was about to make, so a resumed run continues exactly as an
uninterrupted one. Checkpoints grow by the momentum encoder (fp32) and the queues;
tools that load only ``"model"`` (``load_model_ensemble``, eval, datastore builds)
are unaffected, and the model itself is not modified.

Memory: the queues take ``V·L·D·bytes`` (``bytes`` = 4 for ``--queue-dtype fp32``,
2 for fp16/bf16); the criterion refuses to allocate more than ``--queue-max-gib``.
The momentum encoder is an fp32 copy of the model whatever ``--fp16``/``--bf16``
(an EMA with m = 0.999 would stall in fp16).

Data-parallel training is refused: every process would keep its own queues and
the checkpoint would hold only rank 0's. Train on one GPU and use
``--update-freq`` for a larger effective batch.
"""

# no `from __future__ import annotations`: fairseq reads dataclass field types at runtime

import copy
import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics
from fairseq.utils import item
from torch import Tensor, nn

from knnlm.criterions.activation_l2 import ActivationL2Config, ActivationL2Criterion, at_least_fp32
from knnlm.criterions.word_queues import QUEUE_DTYPES, WordQueues, queue_bytes
from knnlm.errors import KnnlmError
from knnlm.models.capture import key_dim

QUEUE_DTYPE_CHOICES = ChoiceEnum(list(QUEUE_DTYPES))
GIB = 1 << 30


@dataclass
class MocoQueueConfig(ActivationL2Config):
    activation_weight: float = field(
        default=1.0,
        metadata={"help": "ω: weight of Σ_i ||sg(q_i) - r||² over the filled slots of the target's queue (Eq. 1)"},
    )
    queue_size: int = field(default=4, metadata={"help": "L: keys kept per target word (FIFO); memory is V*L*D*bytes"})
    queue_dtype: QUEUE_DTYPE_CHOICES = field(
        default="fp32", metadata={"help": "storage dtype of the queues (fp16/bf16 halve their memory)"}
    )
    queue_max_gib: float = field(
        default=4.0,
        metadata={"help": "refuse to allocate queues larger than this many GiB (V*L*D*bytes)"},
    )
    moco_momentum: float = field(
        default=0.999,
        metadata={"help": "m of the momentum encoder update θ_k <- m*θ_k + (1-m)*θ_q after each optimizer step"},
    )


@torch.no_grad()
def parameter_fingerprint(model: nn.Module) -> Tensor:
    """``(Σθ, ||θ||)`` of every parameter tensor in fp64, ``P x 2``: changes whenever the weights do."""
    return torch.stack(
        [
            torch.stack((torch.sum(p, dtype=torch.float64), torch.linalg.vector_norm(p, dtype=torch.float64)))
            for p in model.parameters()
        ]
    )


@register_criterion("moco_queue", dataclass=MocoQueueConfig)
class MocoQueueCriterion(ActivationL2Criterion):
    """Cross-entropy + ω·Σ_i||sg(Q_i^w) − r||² against per-word queues from a momentum encoder (Eq. 1)."""

    def __init__(
        self,
        task,
        activation_weight: float = 1.0,
        knn_key: str = "att",
        sentence_avg: bool = False,
        queue_size: int = 4,
        queue_dtype: str = "fp32",
        queue_max_gib: float = 4.0,
        moco_momentum: float = 0.999,
        ddp_backend: str = "legacy_ddp",
        distributed_world_size: int = 1,
    ) -> None:
        super().__init__(task, activation_weight, knn_key, sentence_avg, ddp_backend, distributed_world_size)
        if self.distributed_world_size > 1:
            raise KnnlmError(
                f"moco_queue keeps its queues in one process, so data-parallel training "
                f"(distributed_world_size={self.distributed_world_size}) would give each GPU its own "
                f"queues; train on one GPU and raise --update-freq for a larger effective batch"
            )
        queue_dtype = str(queue_dtype)
        if queue_dtype not in QUEUE_DTYPES:
            raise KnnlmError(f"--queue-dtype {queue_dtype!r} is not one of {', '.join(QUEUE_DTYPES)}")
        if queue_size < 1:
            raise KnnlmError(f"--queue-size must be >= 1, got {queue_size}")
        if not 0.0 <= moco_momentum <= 1.0:
            raise KnnlmError(f"--moco-momentum must be in [0, 1], got {moco_momentum}")
        if not (math.isfinite(queue_max_gib) and queue_max_gib > 0):
            raise KnnlmError(f"--queue-max-gib must be a positive number, got {queue_max_gib}")
        self.queue_size = int(queue_size)
        self.queue_dtype = queue_dtype
        self.queue_max_gib = float(queue_max_gib)
        self.moco_momentum = float(moco_momentum)
        self.num_words = len(task.target_dictionary)
        # makes fairseq save and restore this criterion's state (see the module docstring)
        self.state_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)
        self.momentum_encoder: Optional[nn.Module] = None
        self.queues: Optional[WordQueues] = None
        self._restored: Optional[dict] = None  # a loaded state waiting for the first forward
        self._online: Optional[weakref.ref] = None

    # -- building, saving and restoring the state ---------------------------------------------

    def _bind(self, model: nn.Module) -> None:
        """Build the momentum encoder and the queues for ``model`` on its first forward."""
        if self.queues is not None:
            if model.training and self._online() is not model:
                raise RuntimeError("a moco_queue criterion trains the one model it first saw")
            return
        dim = key_dim(model.decoder, self.knn_key)
        size = queue_bytes(self.num_words, self.queue_size, dim, self.queue_dtype)
        if size > self.queue_max_gib * GIB:
            raise KnnlmError(
                f"moco_queue: {self.num_words} words x {self.queue_size} slots x {dim} dims x "
                f"{QUEUE_DTYPES[self.queue_dtype][0].itemsize} bytes ({self.queue_dtype}) = "
                f"{size / GIB:.2f} GiB of queues exceeds --queue-max-gib {self.queue_max_gib:g}; "
                f"lower --queue-size, use --queue-dtype fp16/bf16, or raise --queue-max-gib"
            )
        device = next(model.parameters()).device
        # copy before this criterion adds capture hooks to the model
        momentum = copy.deepcopy(model).requires_grad_(False).eval()
        if any(p.dtype in (torch.float16, torch.bfloat16) for p in momentum.parameters()):
            momentum.float()  # an EMA with m close to 1 stalls in 16-bit floats
        for p in momentum.parameters():
            p.grad = None
        self.momentum_encoder = momentum
        self.queues = WordQueues(self.num_words, self.queue_size, dim, self.queue_dtype, device=device)
        # the online weights the momentum encoder last moved towards (here: copied)
        self.register_buffer("updated_from", parameter_fingerprint(model))
        self._online = weakref.ref(model)
        if self._restored is not None:
            state, self._restored = self._restored, None
            try:
                super().load_state_dict(state, strict=True)
            except RuntimeError as err:
                raise KnnlmError(
                    f"cannot restore the moco_queue state of the checkpoint: {err}\nresume with the "
                    f"original model and --queue-size/--queue-dtype/--knn-key, or start a new --save-dir"
                ) from err

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Anchor, momentum encoder, queues, fingerprint; a restored, not yet used state as it was."""
        if self.queues is None and self._restored is not None:
            out = OrderedDict() if destination is None else destination
            for key, value in self._restored.items():
                out[prefix + key] = value
            return out
        return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Restore now if built, else keep the state for the first forward (see module docstring)."""
        if state_dict is None:  # the checkpoint's criterion had no state (e.g. cross_entropy)
            return None
        if self.queues is not None:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        if any(key.startswith("queues.") for key in state_dict):
            self._restored = dict(state_dict)
        return None

    # -- momentum encoder -----------------------------------------------------------------------

    @torch.no_grad()
    def momentum_update(self, model: nn.Module) -> None:
        """θ_k ← m·θ_k + (1 − m)·θ_q, in the momentum encoder's dtype (fp32 or wider)."""
        m = self.moco_momentum
        for p_k, p_q in zip(self.momentum_encoder.parameters(), model.parameters(), strict=True):
            p_k.mul_(m).add_(p_q.detach().to(p_k.dtype), alpha=1.0 - m)

    def _maybe_momentum_update(self, model: nn.Module) -> None:
        """One momentum update if an optimizer step changed the weights since the last one."""
        fingerprint = parameter_fingerprint(model)
        if not torch.equal(fingerprint, self.updated_from):
            self.momentum_update(model)
            self.updated_from.copy_(fingerprint)

    @torch.no_grad()
    def momentum_keys(self, sample: dict, mask: Tensor) -> Tensor:
        """Keys (fp32 or wider) of the momentum encoder (no dropout) at the non-pad targets of ``sample``."""
        encoder = self.momentum_encoder.eval()
        capture = self._capture_for(encoder)
        net_output = encoder(**sample["net_input"], features_only=True)
        return at_least_fp32(self._take_keys(net_output, capture)[mask])

    # -- criterion hooks --------------------------------------------------------------------------

    def forward(self, model: nn.Module, sample: dict, reduce: bool = True):
        self._bind(model)
        if model.training:
            self._maybe_momentum_update(model)
        return super().forward(model, sample, reduce)

    def key_penalty(self, keys: Tensor, words: Tensor) -> tuple[Tensor, dict]:
        """``Σ_{i filled} ||q_i − r_j||²`` per token, expanded so that no ``N x L x D`` tensor is built."""
        filled, sums, sq_sums = self.queues.stats(words, keys.dtype)
        distance = filled * keys.pow(2).sum(-1) - 2.0 * (keys * sums).sum(-1) + sq_sums
        return distance, {"queue_sq_dist": distance.detach().sum(), "queue_fill": filled.sum()}

    def after_loss(self, model: nn.Module, sample: dict, mask: Tensor, words: Tensor) -> None:
        """Append the momentum encoder's keys of this batch's targets (training only)."""
        if model.training:
            self.queues.push(words, self.momentum_keys(sample, mask))

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        """As activation_l2, plus ``queue_sq_dist`` (mean Σ_i||q_i − r||²) and ``queue_fill`` (mean n)."""
        super().reduce_metrics(logging_outputs)
        ntokens = item(sum(log.get("ntokens", 0) for log in logging_outputs))
        if ntokens == 0:
            return
        for key in ("queue_sq_dist", "queue_fill"):
            value = item(sum(log.get(key, 0) for log in logging_outputs))
            metrics.log_scalar(key, value / ntokens, ntokens, round=3)
