"""fairseq criterions for regularized kNN-LM training (registered on import).

* ``activation_l2`` -- cross-entropy + ω·||r||² on the kNN key (Ton et al. 2022, Eq. 2).
* ``moco_queue``    -- cross-entropy + ω·Σ_i||sg(Q_i^w) − r||² against per-word queues
  filled by a momentum encoder (Eq. 1).
"""

from knnlm.criterions.activation_l2 import ActivationL2Criterion
from knnlm.criterions.moco_queue import MocoQueueCriterion
from knnlm.criterions.word_queues import WordQueues, queue_bytes

__all__ = ["ActivationL2Criterion", "MocoQueueCriterion", "WordQueues", "queue_bytes"]
