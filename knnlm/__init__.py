"""knnlm: nearest-neighbour language models on fairseq.

This package is also a fairseq ``--user-dir``. Its architectures, criteria and tasks
are registered with fairseq by :func:`register`, which runs on import when fairseq
is loaded already (as in ``fairseq-train --user-dir knnlm``) and before every
checkpoint load; code that builds fairseq components by name itself calls it first.
Importing ``knnlm`` or a numpy-only module such as :mod:`knnlm.scoring` loads
neither torch nor fairseq.
"""

import sys

__version__ = "0.1.0"


def register() -> None:
    """Register knnlm's fairseq architectures, criteria and tasks (once; later calls do nothing)."""
    from knnlm import criterions, models, softmax_alternatives, tasks  # noqa: F401


if "fairseq" in sys.modules:
    register()
