"""Loading fairseq checkpoints from inside knnlm's hydra apps.

fairseq 0.12 converts old checkpoints (those storing ``args``, e.g. the released
kNN-LM WIKI-103 model) with ``hydra.experimental.initialize``, which Hydra refuses
once a process-wide version base ≥ 1.2 is set — as ``@hydra.main(version_base=...)``
of our apps does. Loading runs under Hydra's 1.1 compatibility base, then restores it.
knnlm's own architectures, criteria and tasks are registered with fairseq first, so a
checkpoint trained with ``--user-dir knnlm`` loads whatever was imported before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from hydra.version import VersionBase, __compat_version__


@contextmanager
def fairseq_hydra_compat() -> Iterator[None]:
    """Let fairseq's in-process config conversion run whatever version base Hydra was given."""
    import knnlm

    knnlm.register()
    base = VersionBase.instance()
    previous = base.getbase()
    base.setbase(__compat_version__)
    try:
        yield
    finally:
        base.version_base = previous  # may be Hydra's "unspecified" sentinel, which setbase() refuses
