"""The compute device a ``--device`` option names (``auto``, ``cpu``, ``cuda``, ``cuda:N``), and the CPU's name."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from knnlm.errors import KnnlmError


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` is the GPU where torch sees one, else the CPU; a GPU that is not there is refused."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise KnnlmError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise KnnlmError(f"--device {device} is not supported; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KnnlmError(f"--device {device} asked for a GPU but torch sees none; use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise KnnlmError(f"--device {device}: torch sees {torch.cuda.device_count()} GPU(s); use cuda:0 or auto")
    return dev


def cpu_model() -> str:
    """The CPU's model name, for results that report where they were measured."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
