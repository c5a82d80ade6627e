"""The ``knnlm`` command line.

``python -m knnlm.cli.<job>`` (the hydra apps) imports this package first, while
``sys.argv[0]`` is still ``"-m"``: logging is configured here, before the job's
module imports fairseq and faiss, so their import-time chatter stays off the
terminal as with the ``knnlm`` command. Hydra then sets up its own job logging
(``hydra.verbose=true`` for debug messages).
"""

import sys

if sys.argv[:1] == ["-m"]:
    from knnlm.cli.main import configure_logging

    configure_logging(verbose=False)
