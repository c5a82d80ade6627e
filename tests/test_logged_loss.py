"""The criteria log their loss finely enough that fairseq keeps the better of two close epochs."""

from __future__ import annotations

import math

import pytest
import torch
from fairseq.logging import metrics

from knnlm.criterions import ActivationL2Criterion, MocoQueueCriterion
from knnlm.criterions.logged_loss import LOSS_DECIMALS
from knnlm.softmax_alternatives.criterion import DatastoreReplacementCriterion

TOKENS = 217_646  # WikiText-2's valid split


def logged_validation_loss(criterion, bits: float) -> float:
    """The ``loss`` fairseq's checkpoint choice reads after one validation pass of mean loss ``bits``."""
    nats = torch.tensor(bits * math.log(2) * TOKENS, dtype=torch.float64)
    log = {"loss": nats, "nll_loss": nats, "ntokens": TOKENS, "sample_size": TOKENS,
           "penalty": 0.0, "key_sq_norm": 0.0, "queue_sq_dist": 0.0, "queue_fill": 0.0}
    with metrics.aggregate() as agg:
        criterion.reduce_metrics([log])
    return agg.get_smoothed_values()["loss"]


def keeps_second(best: float, later: float) -> bool:
    """fairseq's ``checkpoint_best.pt`` rule: a later epoch replaces it when its loss is ``<=`` the best."""
    return later <= best


@pytest.mark.parametrize("criterion", [ActivationL2Criterion, MocoQueueCriterion, DatastoreReplacementCriterion])
def test_a_worse_epoch_within_a_thousandth_of_a_bit_does_not_replace_the_best(criterion):
    # log2 of valid perplexities 187.44 (best) and 187.46 (a later epoch): equal at 3 decimals
    best, later = math.log2(187.44), math.log2(187.46)
    assert round(best, 3) == round(later, 3) and keeps_second(round(best, 3), round(later, 3))
    logged_best, logged_later = logged_validation_loss(criterion, best), logged_validation_loss(criterion, later)
    assert logged_best == pytest.approx(best, abs=0.5 * 10**-LOSS_DECIMALS)
    assert not keeps_second(logged_best, logged_later)
    assert keeps_second(logged_best, logged_validation_loss(criterion, math.log2(187.40)))
