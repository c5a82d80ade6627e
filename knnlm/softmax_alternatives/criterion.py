"""``--criterion ds_replacement``: the objectives a datastore replacement is trained with.

Per non-pad target ``y`` with head log-probabilities ``log P_ds`` and frozen base
LM ``P_LM`` (all sums over tokens, divided by the token count by the trainer):

* ``ce`` (Section 4): ``−log P_ds(y)``;
* ``interpolated`` (Appendix E, Eq. 12): ``−log((1−λ)·P_LM(y) + λ·P_ds(y))``, λ = ``--ds-loss-lambda``;
* ``distill`` (Appendix E): soft labels from the base LM, ``−Σ_w P_LM(w) log P_ds(w)``.

Logged: ``loss`` is the objective; ``nll_loss``/``ppl`` the head's own cross-entropy
(base 2 / perplexity), comparable across objectives.
"""

# no `from __future__ import annotations`: fairseq reads dataclass field types at runtime

from dataclasses import dataclass, field

import torch
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics

from knnlm.criterions.logged_loss import log_loss_bits
from knnlm.errors import KnnlmError
from knnlm.scoring_torch import interpolate

LOSSES = ("ce", "interpolated", "distill")
#: log-probabilities below this (a clustered datastore gives -inf to words no cluster holds)
#: are floored for training only, so that one unseen target does not make the loss infinite
LOG_FLOOR = -50.0


@dataclass
class DatastoreReplacementLossConfig(FairseqDataclass):
    ds_loss: ChoiceEnum(list(LOSSES)) = field(default="ce", metadata={"help": "training objective, see the module"})
    ds_loss_lambda: float = field(default=0.25, metadata={"help": "λ of the interpolated loss (Eq. 12)"})


@register_criterion("ds_replacement", dataclass=DatastoreReplacementLossConfig)
class DatastoreReplacementCriterion(FairseqCriterion):
    def __init__(self, task, ds_loss: str = "ce", ds_loss_lambda: float = 0.25) -> None:
        super().__init__(task)
        if not 0.0 < ds_loss_lambda < 1.0:
            raise KnnlmError(f"--ds-loss-lambda must be in (0, 1), got {ds_loss_lambda}")
        self.ds_loss = str(ds_loss)
        self.lam = float(ds_loss_lambda)

    def objective(self, model, net_input: dict, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token objective, per-token head NLL), both ``[B, T]``; only ``distill`` needs the
        whole distributions (head and base), the others the targets' log-probabilities."""
        if self.ds_loss == "distill":
            head, keys = model(**net_input)
            head = head.float().clamp(min=LOG_FLOOR)
            head_t = head.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            return -(model.base_log_probs(keys).float().exp() * head).sum(-1), -head_t
        head_t, keys = model(**net_input, target=target)
        head_t = head_t.float().clamp(min=LOG_FLOOR)
        if self.ds_loss == "ce":
            return -head_t, -head_t
        return -interpolate(model.base_target_log_probs(keys, target), head_t, self.lam), -head_t

    def forward(self, model, sample, reduce: bool = True):
        target = sample["target"]
        keep = target.ne(self.padding_idx)
        per_token, nll = self.objective(model, sample["net_input"], target.clamp(min=0))
        loss = per_token[keep].sum()
        nll_loss = nll[keep].sum()
        ntokens = int(keep.sum())
        logging_output = {
            "loss": loss.detach(),
            "nll_loss": nll_loss.detach(),
            "ntokens": ntokens,
            "nsentences": sample["target"].size(0),
            "sample_size": ntokens,
        }
        return loss, ntokens, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        loss = sum(float(log.get("loss", 0)) for log in logging_outputs)
        nll = sum(float(log.get("nll_loss", 0)) for log in logging_outputs)
        ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        log_loss_bits("loss", loss, sample_size)
        log_loss_bits("nll_loss", nll, ntokens)
        metrics.log_derived("ppl", lambda meters: 2 ** meters["nll_loss"].avg)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
