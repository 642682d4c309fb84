"""Where a job runs: the one rule for a ``--device`` value and the torch device it names.

``"auto"`` (CUDA when torch sees a GPU, else the CPU), ``"cpu"``, ``"cuda"`` (the current GPU) or ``"cuda:N"``
(GPU number N). :func:`check_device` checks the spelling without torch (the Slicer panels and ``--help`` need no
torch); :func:`resolve_device` also checks that the machine has that device.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported only where a device is resolved
    import torch

__all__ = ["AUTO", "DEVICE_CHOICES", "check_device", "resolve_device"]

AUTO = "auto"
DEVICE_CHOICES = (AUTO, "cpu", "cuda", "cuda:N")
"""How ``--device`` is spelt everywhere (``N`` is a GPU number, 0-based)."""
_SPELLING = re.compile(r"auto|cpu|cuda(:\d+)?")


def _wrong(device: Any) -> ValueError:
    return ValueError(f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def check_device(device: Any) -> str:
    """The device name, lower-cased and stripped, when it is spelt as one of :data:`DEVICE_CHOICES`.

    Raises:
        ValueError: any other value (the message names ``--device`` and quotes the value).
    """
    if not isinstance(device, str) or not _SPELLING.fullmatch(device.strip().lower()):
        raise _wrong(device)
    return device.strip().lower()


def resolve_device(device: Any = AUTO) -> torch.device:
    """The torch device for a device name (see :func:`check_device`) or a ``torch.device``.

    Raises:
        ValueError: a wrong spelling, or CUDA asked for where there is none (or fewer GPUs than its number).
    """
    import torch

    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = check_device(device)
    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(name)
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise _wrong(device)
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but CUDA is not available here (torch "
                         f"{torch.__version__}, built with CUDA {torch.version.cuda}); use --device cpu or auto")
    if resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} was asked for, but only {torch.cuda.device_count()} CUDA device(s) "
                         f"exist (numbered from 0)")
    return resolved
