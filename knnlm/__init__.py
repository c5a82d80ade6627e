"""knnlm: nearest-neighbour language models on fairseq.

This package is also a fairseq ``--user-dir``: importing it registers the
architectures, criterions and tasks with fairseq.
"""

__version__ = "0.1.0"

from knnlm import criterions, models, softmax_alternatives, tasks  # noqa: E402,F401  (registers fairseq components)
