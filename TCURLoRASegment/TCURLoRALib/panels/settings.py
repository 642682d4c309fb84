"""Device choices, value ranges and defaults of both panels (torch-free, so the module files read them at load)."""
from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["BASE_ONLY", "DEVICES", "LR_RANGE", "MINUTES_RANGE", "OVERLAP_RANGE", "PANEL_MINUTES", "RANK_RANGE",
           "SEGMENT_OVERLAP", "STEPS_RANGE", "Device", "TrainDefaults", "postprocess_rule", "train_defaults"]

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
MINUTES_RANGE = (0, 24 * 60)
"""Whole minutes of the Train panel's time budget; 0 is no budget (``steps`` alone decides)."""
PANEL_MINUTES = 10
"""The Train panel's time budget (the CLI has none by default): someone at the scanner waits for the adapter, and
10 minutes of one CPU thread ran 450-490 steps in the few-shot benchmark (Testing/benchmarks/README.md,
``bench_quality.py``), more than the 200 steps the panel starts from need on most machines."""

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
        minutes: wall-time budget of training in whole minutes (0: none, ``steps`` decides).
        mirror: also train on the cases mirrored left/right, with left/right labels swapped.
    """

    rank: int
    steps: int
    lr: float
    minutes: int = 0
    mirror: bool = False


def train_defaults() -> TrainDefaults:
    """The engine's training defaults (:class:`~TCURLoRALib.settings.TrainSettings`, torch-free) and the panel's
    time budget (:data:`PANEL_MINUTES`), for the Train panel's parameter node: the one place the panels take them
    from."""
    from ..settings import TrainSettings

    engine = TrainSettings()
    return TrainDefaults(rank=TrainSettings.NEW_RANK, steps=engine.steps, lr=engine.lr, minutes=PANEL_MINUTES,
                         mirror=engine.mirror)


def postprocess_rule(keep_largest_component: bool) -> str:
    """The ``segment --postprocess`` rule of the Segment panel's "Keep largest piece" check box."""
    return "largest-component" if keep_largest_component else "none"
