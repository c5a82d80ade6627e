"""Analyses of kNN-LMs and their representations, each a PNG figure plus the numbers behind it.

====================  ===================================================================
module                analysis
====================  ===================================================================
``frequency``         words binned by training frequency, coloured by accumulated loss
                      (Ton et al. 2022, Fig. 2)
``clustering``        GMM log-likelihood of high- vs low-loss tokens' representations
                      (Ton et al. 2022, Fig. 3)
``benefit``           per word, how often the kNN part beats the LM under FAISS vs real
                      mask, against word length and bigram entropy (Xu et al. 2023, App. D)
``position``          perplexity by position in the context window (Xu et al. 2023, App. E.3)
``stolen``            words that can never be the argmax of the softmax (Xu et al. 2023,
                      App. E.4)
====================  ===================================================================

The math (binning, mixture log-likelihoods, separation statistics, bigram entropy,
per-bucket perplexity, the argmaxable test) is in pure functions over arrays; each
module's ``run(config)`` reads the caches/checkpoints, then writes ``<name>.png``,
``<name>.csv`` and, last, ``<name>.json``. ``knnlm analyze`` (``knnlm.cli.analyze``)
is the command line and hydra front end.
"""

from .benefit import BenefitConfig, knn_win_shares
from .clustering import ClusteringConfig, gmm_loglik, loss_split
from .frequency import FrequencyConfig, frequency_loss, log_bins
from .position import PositionConfig, position_perplexity
from .stats import bigram_entropy, separation, trend
from .stolen import StolenConfig, argmaxable_words, load_output_embedding
from .vocab import Vocabulary, read_dictionary

__all__ = [
    "BenefitConfig",
    "ClusteringConfig",
    "FrequencyConfig",
    "PositionConfig",
    "StolenConfig",
    "Vocabulary",
    "argmaxable_words",
    "bigram_entropy",
    "frequency_loss",
    "gmm_loglik",
    "knn_win_shares",
    "load_output_embedding",
    "log_bins",
    "loss_split",
    "position_perplexity",
    "read_dictionary",
    "separation",
    "trend",
]
