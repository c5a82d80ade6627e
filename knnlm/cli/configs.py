"""Where the hydra apps find their configs: ``knnlm/conf/<group>``, shipped inside the package.

``knnlm/conf`` is the top-level ``configs/`` folder of the repository (a link there, copied
into the wheel), so a checkout, an editable install and a wheel install all read the same files.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from knnlm.errors import KnnlmError


def config_dir(group: str) -> Path:
    """The folder of one config group (``score``, ``analyze``, ``train``, ...)."""
    folder = Path(str(resources.files("knnlm") / "conf" / group))
    if not folder.is_dir():
        raise KnnlmError(f"the {group} configs are missing from {folder.parent}: reinstall knnlm")
    return folder


def run_schema_app(name: str, schema: type, job: Callable[[Any], str], command: str) -> int:
    """A hydra app whose config is the dataclass ``schema`` (``key=value`` overrides, no YAML).

    ``job`` gets the filled dataclass and returns what to print; a :class:`KnnlmError`
    is printed as ``<command>: error: ...`` and gives exit status 2, as on the command line.
    """
    import hydra
    from hydra.core.config_store import ConfigStore
    from omegaconf import DictConfig, OmegaConf

    ConfigStore.instance().store(name=name, node=schema)
    status = 0

    @hydra.main(version_base=None, config_path=None, config_name=name)
    def app(cfg: DictConfig) -> None:
        nonlocal status
        try:
            print(job(OmegaConf.to_object(cfg)))
        except KnnlmError as err:
            print(f"{command}: error: {err}", file=sys.stderr)
            status = 2

    app()
    return status
