"""Trainable replacements of the datastore on a frozen base LM (Xu et al. 2023, Section 4, App. C, E).

Importing this package registers ``--arch knnlm_ds_replacement`` and
``--criterion ds_replacement`` with fairseq.
"""

from knnlm.softmax_alternatives import criterion, model  # noqa: F401  (registers fairseq components)
