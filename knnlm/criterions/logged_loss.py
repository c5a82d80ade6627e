"""The loss as knnlm's criteria log it: in bits, with enough decimals for fairseq's checkpoint choice.

fairseq keeps ``checkpoint_best.pt`` by the validation loss *as logged*, rounded, and replaces it at
every epoch whose rounded loss is ``<=`` the best so far. At the 3 decimals fairseq's own criteria
log, two epochs within 0.0005 bits (0.035% perplexity) tie and the later one is kept even when it
is worse: on WikiText-2, an epoch at valid perplexity 187.46 replaced one at 187.44. At 4 decimals
a tie needs the two within 0.00005 bits.
"""

import math

from fairseq.logging import metrics

#: decimals of every logged loss (bits per token)
LOSS_DECIMALS = 4


def log_loss_bits(key: str, nats: float, count: float) -> None:
    """Log a loss summed over ``count`` tokens (or sentences), in nats, as ``key``: bits per unit."""
    metrics.log_scalar(key, nats / max(count, 1) / math.log(2), count, round=LOSS_DECIMALS)
