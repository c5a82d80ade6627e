"""Where the hydra apps find their configs: ``knnlm/conf/<group>``, shipped inside the package.

``knnlm/conf`` is the top-level ``configs/`` folder of the repository (a link there, copied
into the wheel), so a checkout, an editable install and a wheel install all read the same files.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from knnlm.errors import KnnlmError


def config_dir(group: str) -> Path:
    """The folder of one config group (``score``, ``analyze``, ``train``, ...)."""
    folder = Path(str(resources.files("knnlm") / "conf" / group))
    if not folder.is_dir():
        raise KnnlmError(f"the {group} configs are missing from {folder.parent}: reinstall knnlm")
    return folder
