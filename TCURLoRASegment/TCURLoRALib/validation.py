"""Validation during training: which cases validate (:func:`split_cases`) and how well a state does on them.

The automatic split (``--validation auto``, the default), with N training cases given:

- N = 1: no validation, the last state is written;
- N = 2 or 3: case number ``seed % N`` (0-based, in the given order) is held out, the others train, so runs with
  seeds 0, 1, 2 rotate through the cases;
- N >= 4: ``ceil(N / 5)`` cases, drawn by a permutation seeded with ``seed``, are held out.

A state is scored by the Dice of each foreground label (:func:`metrics.dice`, whose rule gives 1.0 to a label absent
from both the case and the prediction) over the annotated voxels of full-volume sliding-window inference on the
model grid (the segmentation's own path, :func:`segmentation.sliding_window_logits`), averaged over the validation cases.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .cards import Label
from .cases import IGNORE_INDEX, PreparedCase, TrainingCase, find_cases
from .metrics import dice
from .segmentation import sliding_window_logits

__all__ = ["SLIDING_WINDOW_OVERLAP", "Split", "dice_per_label", "predict_labels", "split_cases", "validate"]

SLIDING_WINDOW_OVERLAP = 0.25


@dataclass(frozen=True)
class Split:
    """Training and validation cases, and why they were split so (a sentence for the user).

    Args:
        train: the cases that train.
        validation: the cases that validate (may be empty).
        reason: the rule that chose them, naming the options that change it.
    """

    train: list
    validation: list
    reason: str

    def describe(self) -> str:
        """``"cases: 2 train (a, b), 1 validates (c): <reason>"``."""
        def names(cases: Sequence[TrainingCase]) -> str:
            return f" ({', '.join(case.name for case in cases)})" if cases else ""

        count = len(self.validation)
        validates = "none validates" if not count else f"{count} validate" + ("s" if count == 1 else "")
        return (f"cases: {len(self.train)} train{names(self.train)}, {validates}{names(self.validation)}: "
                f"{self.reason}")


def split_cases(cases: Sequence[TrainingCase], validation: str | Sequence[Any], seed: int) -> Split:
    """Training and validation cases by the rule in the module docstring.

    Args:
        cases: all given training cases.
        validation: ``"auto"``, ``"none"``, or the validation cases (a folder, JSON file or list).
        seed: seeds the draw for four cases or more.
    """
    cases = list(cases)
    n = len(cases)
    if not (isinstance(validation, str) and validation in ("auto", "none")):
        return Split(cases, find_cases(validation), "validation cases given with --validation")
    if validation == "none":
        return Split(cases, [], "--validation none: every case trains; the state after the last step is written")
    if n == 1:
        return Split(cases, [], "one case: nothing to hold out for validation (--validation auto), so the state "
                                "after the last step is written; give more cases or --validation CASES")
    if n <= 3:
        held = seed % n
        return Split([c for i, c in enumerate(cases) if i != held], [cases[held]],
                     f"--validation auto holds out 1 of {n} cases: number --seed % {n} = {held} (0-based, in the "
                     f"order given); the state with the best validation Dice is written")
    count = math.ceil(n / 5)
    held_out = set(np.random.default_rng(seed).permutation(n)[:count].tolist())
    return Split([c for i, c in enumerate(cases) if i not in held_out],
                 [c for i, c in enumerate(cases) if i in held_out],
                 f"--validation auto holds out ceil({n} / 5) = {count} of {n} cases, drawn with --seed {seed}; the "
                 f"state with the best validation Dice is written")


@torch.no_grad()
def predict_labels(model: nn.Module, image: np.ndarray, patch_size: Sequence[int]) -> np.ndarray:
    """Channel index of every voxel by sliding-window inference (Gaussian blending, overlap 0.25), on the device of
    the model's parameters.

    Args:
        image: float32 (D, H, W) on the model grid.

    Returns:
        int64 (D, H, W).
    """
    device = next(model.parameters()).device
    volume = torch.from_numpy(np.ascontiguousarray(image)).to(device)
    logits = sliding_window_logits(model, volume, patch_size, overlap=SLIDING_WINDOW_OVERLAP)
    return logits.argmax(0).cpu().numpy()


def dice_per_label(prediction: np.ndarray, target: np.ndarray, n_channels: int) -> list[float]:
    """Dice (:func:`metrics.dice`) of channels 1..n_channels-1 over the annotated voxels of ``target``."""
    annotated = target != IGNORE_INDEX
    return [dice((prediction == channel) & annotated, target == channel) for channel in range(1, n_channels)]


def validate(model: nn.Module, cases: Sequence[PreparedCase], labels: Sequence[Label],
             patch_size: Sequence[int]) -> dict[str, Any]:
    """Dice per foreground label (by name; the mean over the cases) and their mean ``"mean"`` (None without a
    foreground label)."""
    was_training = model.training
    model.eval()
    per_case = [dice_per_label(predict_labels(model, case.image, patch_size), case.target, len(labels))
                for case in cases]
    model.train(was_training)
    scores = {label.name: round(float(np.mean([case[index] for case in per_case])), 4)
              for index, label in enumerate(labels[1:])}
    return {"dice": scores, "mean": round(float(np.mean(list(scores.values()))), 4) if scores else None}
