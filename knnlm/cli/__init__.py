"""The ``knnlm`` command line."""
