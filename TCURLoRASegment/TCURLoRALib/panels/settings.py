"""Device choices, value ranges and defaults of both panels (torch-free, so the module files read them at load)."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

__all__ = ["BASE_ONLY", "DEVICES", "LR_RANGE", "OVERLAP_RANGE", "RANK_RANGE", "SEGMENT_OVERLAP", "STEPS_RANGE",
           "Device", "TrainDefaults", "train_defaults"]

DEVICES = ("auto", "cpu", "cuda")
"""Device choices of both panels, as the CLI spells them (a subset of ``devices.DEVICE_CHOICES``: the panels offer
no GPU number)."""
BASE_ONLY = "none"
"""The CLI's ``--adapter`` value for the base model without an adapter."""
SEGMENT_OVERLAP = 0.25
"""Sliding-window overlap the Segment panel starts from (the CLI's default)."""
OVERLAP_RANGE = (0.0, 0.9)
RANK_RANGE = (1, 64)
STEPS_RANGE = (1, 100_000)
LR_RANGE = (1e-6, 1.0)

_DEVICE_LABELS = {"auto": "Auto (GPU if available)", "cpu": "CPU", "cuda": "GPU (CUDA)"}


class Device(enum.Enum):
    """Where a background job runs the network; values are the CLI's ``--device`` spellings."""

    AUTO = "auto"
    CPU = "cpu"
    GPU = "cuda"

    def label(self) -> str:
        """Text of the device combo box (Slicer's parameter-node combo-box connector calls ``label``)."""
        return _DEVICE_LABELS[self.value]


@dataclass(frozen=True)
class TrainDefaults:
    """The training settings the Train panel starts from.

    Attributes:
        rank: tensor CUR rank r.
        steps: optimiser steps.
        lr: learning rate of the decoder and head.
        minutes: wall-time budget of training (None: none, ``steps`` decides).
        mirror: also train on the cases mirrored left/right, with left/right labels swapped.
    """

    rank: int
    steps: int
    lr: float
    minutes: Optional[float] = None
    mirror: bool = False


def train_defaults() -> TrainDefaults:
    """The engine's training defaults (:class:`~TCURLoRALib.settings.TrainSettings`, torch-free), for the Train
    panel's parameter node: the one place the panels take them from."""
    from ..settings import TrainSettings

    engine = TrainSettings()
    return TrainDefaults(rank=TrainSettings.NEW_RANK, steps=engine.steps, lr=engine.lr, minutes=engine.minutes,
                         mirror=engine.mirror)
